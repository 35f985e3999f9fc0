"""Running the gateway: both ports, signals (SIGTERM drains, SIGHUP reloads), graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from gateway.app import Seams, create_admin_app, create_app, create_gateway
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.gateway import Gateway
from gateway.observability import Metrics, log_event, setup_logging
from gateway.runtime import build_runtime
from gateway.signals import SignalLatch

GC_GEN0_THRESHOLD: Final = 20_000


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int
    admin_port: int
    reuse_port: bool = False  # one of several workers on the same ports
    metrics_dir: str | None = None  # the workers' shared prometheus multiprocess directory


def reload_config(gateway: Gateway, path: Path) -> bool:
    """Re-read the file; swap it in if valid, keep the old one (and say why) if not."""
    old = gateway.runtime.config
    try:
        config = load_config(path)
        runtime = build_runtime(config)
        if config.state != old.state:
            # The store was opened at start-up; another one would silently void its promises.
            raise ConfigError("state: changing the state settings needs a restart")
        if config.outbox != old.outbox:
            # Its store, keys and deliverer were set up at start-up, like the state store.
            raise ConfigError("outbox: changing the outbox settings needs a restart")
    except ConfigError as exc:
        log_event(40, "config_reload_refused", reason=str(exc), config=gateway.config_digest)
        return False
    if _listening(config) != _listening(old) or (
        config.idempotency.max_entries != old.idempotency.max_entries
    ):
        log_event(
            30, "config_change_needs_restart", reason="server ports, read_timeout_s or max_entries"
        )
    if config.logging != old.logging:
        setup_logging(config.logging.level, config.logging.format)
    if config.manager != old.manager and gateway.manager_client is not None:
        gateway.manager_client = gateway.manager_client.with_config(config.manager)
    if config.pdf != old.pdf and gateway.pdf_fetcher is not None:
        gateway.pdf_fetcher.reconfigure(config.pdf)
    if gateway.callbacks is not None:
        gateway.callbacks.reconfigure(config.outbox, config.webhooks)
    gateway.runtime = runtime  # one assignment: requests in flight keep the runtime they read
    gateway.metrics.set_config(config.digest)
    log_event(20, "config_reloaded", config=gateway.config_digest)
    return True


def _listening(config: Config) -> tuple[str, int, int, float]:
    # read_timeout_s: the headers' deadline is set on the listening apps (app.connection_settings)
    # when they start; the body's deadline follows a reload.
    server = config.server
    return server.host, server.port, server.admin_port, server.read_timeout_s


async def serve(
    config: Config, path: Path, listen: Listen, *, latch: SignalLatch | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain: /readyz 503, finish requests in flight, stop.

    ``latch``: signals that arrived while starting, honoured as soon as this runs.
    """
    gateway = create_gateway(config, Seams(metrics=Metrics(multiprocess_dir=listen.metrics_dir)))
    runner = web.AppRunner(
        create_app(config, gateway=gateway),
        access_log=None,  # the middleware writes one structured line per request instead
        shutdown_timeout=config.server.shutdown_timeout_s,
    )
    admin: web.AppRunner | None = None
    await runner.setup()
    try:
        await web.TCPSite(runner, listen.host, listen.port, reuse_port=listen.reuse_port).start()
        if listen.admin_port:
            admin = web.AppRunner(create_admin_app(gateway), access_log=None, shutdown_timeout=1)
            await admin.setup()
            site = web.TCPSite(admin, listen.host, listen.admin_port, reuse_port=listen.reuse_port)
            await site.start()
    except OSError:  # a port is taken: close what was opened, the CLI says which
        await runner.cleanup()
        if admin is not None:
            await admin.cleanup()
        raise
    # Start-up objects (modules, configuration, sessions) live as long as the process: keep them
    # out of every later collection, and collect the young generation less often (a request
    # allocates a few hundred short-lived containers; most die with it, by reference counting).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    log_event(
        20, "listening", host=listen.host, port=listen.port, admin_port=listen.admin_port or None,
        config=gateway.config_digest,
    )  # fmt: skip

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_config, gateway, path)
    for signum in latch.take() if latch is not None else ():
        if signum == signal.SIGHUP:
            reload_config(gateway, path)
        else:
            stop.set()
    try:
        await stop.wait()
        gateway.draining = True
        log_event(20, "draining", reason="signal")
        if config.server.drain_s:
            await asyncio.sleep(config.server.drain_s)
        await runner.cleanup()  # stops accepting, waits for requests in flight, closes sessions
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if admin is not None:
            await admin.cleanup()
        log_event(20, "stopped")
