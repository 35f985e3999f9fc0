"""Building the aiohttp applications (partner port, admin port) and their services' lifecycle."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from gateway.callbacks import Callbacks
from gateway.config import Config
from gateway.console.handlers import add_console_routes
from gateway.gateway import GATEWAY_KEY, Gateway
from gateway.manager import USER_AGENT, ManagerClient
from gateway.middleware import create_middleware
from gateway.observability import Metrics, RequestLog, log_event
from gateway.outbox.deliverer import Outbox
from gateway.outbox.factory import create_outbox_store, open_outbox_store
from gateway.outbox.sealing import Sealer
from gateway.pdf import PdfFetcher
from gateway.routes import add_admin_routes, add_order_routes
from gateway.runtime import build_runtime
from gateway.state import StateStore
from gateway.state.memory import MemoryStore

KEEPALIVE_S = 30.0
UNLIMITED_BODY = 1 << 40
MAX_LINGERING_S = 10.0  # aiohttp's default


@dataclass(frozen=True)
class Seams:
    """What tests replace: time, sleep, randomness, and DNS for the PDF fetcher."""

    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic  # idempotency expiry and rate-limit buckets
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rand: Callable[[], float] = random.random
    pdf_resolver: AbstractResolver | None = None
    callback_resolver: AbstractResolver | None = None
    metrics: Metrics = field(default_factory=Metrics)
    # How often the outbox's deliverer (and the callback sender) look for due work; None: tests
    # call run_once.
    deliverer_poll_s: float | None = 1.0
    outbox_max_pages: int | None = None  # tests: a full disk, as SQLite reports it


def create_gateway(config: Config, seams: Seams | None = None) -> Gateway:
    """The shared state for both apps (compiles the configuration)."""
    seams = seams or Seams()
    runtime = build_runtime(config)
    # With the outbox, its store is also the state store: idempotency records survive a restart.
    outbox_store = (
        create_outbox_store(config, clock=seams.clock, max_pages=seams.outbox_max_pages)
        if config.outbox.enabled
        else None
    )
    gateway = Gateway(
        runtime=runtime,
        state=create_store(config, seams) if outbox_store is None else outbox_store,
        metrics=seams.metrics,
        request_log=RequestLog(clock=seams.clock),
        clock=seams.clock,
        created_at=seams.clock(),
    )
    if outbox_store is not None:
        gateway.outbox = Outbox(
            outbox_store, Sealer(config.outbox.keys), config.outbox,
            metrics=seams.metrics, clock=seams.clock, rand=seams.rand,
        )  # fmt: skip
        callbacks = Callbacks(
            outbox_store, config.outbox, config.webhooks, metrics=seams.metrics,
            clock=seams.clock, rand=seams.rand, resolver_inner=seams.callback_resolver,
        )  # fmt: skip
        gateway.callbacks = callbacks
        # Orders the deliverer settles are announced to partners that listen (section 11).
        gateway.outbox.on_settled = lambda entry: callbacks.enqueue_settled(
            entry, gateway.runtime.callbacks
        )
    gateway.metrics.set_config(config.digest)
    return gateway


def create_store(config: Config, seams: Seams) -> StateStore:
    """The configured state backend without the outbox: this process's memory, or Redis."""
    if config.state.backend == "redis":
        from gateway.state.redis import RedisStore  # only then: redis-py costs memory and start-up

        assert config.state.redis_url is not None  # load_config resolved it
        return RedisStore(config.state.redis_url.get_secret_value())
    return MemoryStore(
        max_entries=config.idempotency.max_entries,
        clock=seams.monotonic,
    )


def create_app(
    config: Config, seams: Seams | None = None, *, gateway: Gateway | None = None
) -> web.Application:
    """The partner-facing app; with ``admin_port = 0`` it also serves the admin endpoints."""
    seams = seams or Seams()
    gateway = gateway or create_gateway(config, seams)
    # Body size is enforced by intake.py against the live server.max_body_mb (which a reload may
    # raise); aiohttp's own 1 MiB default would refuse bodies the operator allowed.
    app = web.Application(
        middlewares=[create_middleware(gateway.metrics, gateway.request_log)],
        client_max_size=UNLIMITED_BODY,
        handler_args=connection_settings(config),
    )
    app[GATEWAY_KEY] = gateway
    add_order_routes(app)
    if config.server.admin_port == 0:
        add_admin_routes(app)
    app.cleanup_ctx.append(_services(gateway, seams))
    return app


def connection_settings(config: Config) -> dict[str, object]:
    """How aiohttp serves each connection of both ports.

    ``keepalive_timeout``: aiohttp closes a connection whose next request's headers are not
    complete this long after it opened or its previous answer was sent; that is the headers'
    deadline (the body's is kept by intake.py). ``lingering_time``: after an answer given before
    the body was all read (a 408, a 413, a 401), aiohttp reads and drops the rest for this long
    so that the client sees the answer, then closes; a trickling client gets no more than the
    deadline again. ``auto_decompress`` off: intake.py decodes Content-Encoding itself, counting
    decoded bytes against the limit, so that a broken encoding is the contract's 400 rather than
    aiohttp's plain-text one.
    """
    read_timeout_s = config.server.read_timeout_s
    return {
        "keepalive_timeout": read_timeout_s,
        "lingering_time": min(MAX_LINGERING_S, read_timeout_s),
        "auto_decompress": False,
    }


def create_admin_app(gateway: Gateway) -> web.Application:
    """``/healthz``, ``/readyz``, ``/metrics`` for operators and probes, on their own port, and
    the operator console (``/``). The console is never served on the partner port, not even with
    ``admin_port = 0``: that port faces the partners (and the internet)."""
    app = web.Application(
        middlewares=[create_middleware(None, None)],
        handler_args=connection_settings(gateway.runtime.config),
    )
    app[GATEWAY_KEY] = gateway
    add_admin_routes(app)
    add_console_routes(app)
    return app


def _services(gateway: Gateway, seams: Seams) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        config = gateway.runtime.config
        connector = aiohttp.TCPConnector(
            limit=config.manager.pool_size, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=300
        )
        session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        shared = None
        if config.state.share_tokens:
            from gateway.state.redis import RedisStore, RedisTokens

            assert isinstance(gateway.state, RedisStore)  # config: share_tokens needs redis
            shared = RedisTokens(gateway.state, clock=seams.clock, sleep=seams.sleep)
        gateway.manager_client = ManagerClient(
            session, config.manager, metrics=gateway.metrics,
            clock=seams.clock, sleep=seams.sleep, rand=seams.rand, shared_tokens=shared,
        )  # fmt: skip
        gateway.pdf_fetcher = PdfFetcher(
            config.pdf,
            resolver_inner=seams.pdf_resolver,
            record=lambda result: gateway.metrics.pdf_fetches.labels(result=result).inc(),
        )
        await gateway.pdf_fetcher.start()
        deliverer = await _start_outbox(gateway, seams)
        sender = await _start_callbacks(gateway, seams)
        gateway.started = True
        log_event(20, "services_started", config=gateway.config_digest)
        try:
            yield
        finally:
            gateway.started = False
            if deliverer is not None:
                assert gateway.outbox is not None
                gateway.outbox.stop()  # deliveries in flight finish; none is cut off midway
                await deliverer
            if gateway.callbacks is not None:
                gateway.callbacks.stop()
                if sender is not None:
                    await sender
                await gateway.callbacks.close()
            await gateway.pdf_fetcher.close()
            await session.close()
            await gateway.state.close()

    return lifecycle


async def _start_outbox(gateway: Gateway, seams: Seams) -> asyncio.Task[None] | None:
    """Open the outbox's store and start its deliverer (None: no outbox, or no loop in tests)."""
    outbox = gateway.outbox
    if outbox is None:
        return None
    await open_outbox_store(outbox.store)  # a store that cannot be used says so in the log
    if seams.deliverer_poll_s is None:
        return None
    poll_s = min(seams.deliverer_poll_s, outbox.config.retry_min_s)
    return asyncio.create_task(
        outbox.run(lambda: gateway.runtime.targets, lambda: gateway.manager, poll_s=poll_s),
        name="outbox-deliverer",
    )


async def _start_callbacks(gateway: Gateway, seams: Seams) -> asyncio.Task[None] | None:
    """Start the partner callback sender (None: no outbox, or no loop in tests)."""
    callbacks = gateway.callbacks
    if callbacks is None:
        return None
    await callbacks.start()
    if seams.deliverer_poll_s is None:
        return None
    poll_s = min(seams.deliverer_poll_s, callbacks.outbox.retry_min_s)
    return asyncio.create_task(
        callbacks.run(lambda: gateway.runtime.callbacks, poll_s=poll_s), name="callback-sender"
    )
