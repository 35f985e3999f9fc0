"""The ``gateway`` command: serve, map, check-config, new-key, hash-key, sandbox, new-secret,
outbox."""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import secrets
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from gateway.auth import hash_key
from gateway.config import Config, load_config, read_env_secret, resolve_config_path
from gateway.errors import ConfigError, GatewayError
from gateway.intake import parse_json_object
from gateway.ledger import build_status
from gateway.observability import setup_logging
from gateway.orders import prepare_order
from gateway.outbox import LedgerEntry, OrderStatus
from gateway.runtime import Runtime, build_runtime
from gateway.signals import SignalLatch
from gateway.upstream_proxy import describe_proxy

EXIT_OK: Final = 0
EXIT_INVALID: Final = 1
EXIT_CONFIG: Final = 2
EXIT_FAILED: Final = 1
DEFAULT_SANDBOX_PORT: Final = 8090
SANDBOX_SECRET_ENV: Final = "SANDBOX_WEBHOOK_SECRET"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Telemedicine partners' orders in, PharmaOne Manager order requests out.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway until SIGTERM/SIGINT")
    serve.add_argument(
        "--config", help="TOML file (else $GATEWAY_CONFIG, else config/gateway.toml)"
    )
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the ports")
    # Set by the supervisor of --workers N on each worker; not for people.
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--metrics-dir", help=argparse.SUPPRESS)

    mapping = commands.add_parser("map", help="print the envelope a partner's file becomes")
    mapping.add_argument("--config", required=True)
    mapping.add_argument("--partner", required=True)
    mapping.add_argument("file", type=Path)

    check = commands.add_parser("check-config", help="validate the file and its secrets")
    check.add_argument("--config")

    commands.add_parser("new-key", help="print a fresh partner key and its key_sha256")
    commands.add_parser("hash-key", help="read a key on stdin, print its key_sha256")

    sandbox = commands.add_parser("sandbox", help="run the local Manager stand-in")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=DEFAULT_SANDBOX_PORT)
    sandbox.add_argument(
        "--webhook-url", help=f"send signed webhooks there (secret from ${SANDBOX_SECRET_ENV})"
    )

    secret = commands.add_parser(
        "new-secret", help="print a fresh secret for the outbox or webhooks"
    )
    secret.add_argument("kind", choices=("outbox", "webhook"))

    outbox = commands.add_parser("outbox", help="stored orders: list, retry a failed one, drop")
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="orders and their delivery state")
    listing.add_argument("--config")
    listing.add_argument("--status", choices=[status.value for status in OrderStatus])
    listing.add_argument("--json", action="store_true", help="one JSON document")
    listing.add_argument("--limit", type=int, default=100)
    for name, text in (
        ("retry", "a failed order goes back to queued"),
        ("drop", "discard a queued or failed order's body"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("--config")
        action.add_argument("--partner", required=True)
        action.add_argument("reference")
    return parser


def main(argv: Sequence[str] | None = None, *, latch: SignalLatch | None = None) -> int:
    """Run one command; ``latch`` holds the signals that ``serve`` received while starting."""
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": functools.partial(_serve, latch=latch),
        "map": _map,
        "check-config": _check_config,
        "new-key": _new_key,
        "hash-key": _hash_key,
        "sandbox": _sandbox,
        "new-secret": _new_secret,
        "outbox": _outbox,
    }
    return handlers[args.command](args)


def _load(path: str | None) -> tuple[Config, Runtime] | None:
    try:
        config = load_config(resolve_config_path(path))
        return config, build_runtime(config)
    except ConfigError as exc:
        print(f"gateway: configuration refused: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace, latch: SignalLatch | None) -> int:
    from gateway.server import Listen, serve

    loaded = _load(args.config)
    if loaded is None:
        return EXIT_CONFIG
    config, _ = loaded
    if args.workers < 1:
        print("gateway: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.workers > 1:
        if config.state.backend != "redis":
            print(
                'gateway: --workers N > 1 needs state.backend = "redis": with in-memory state '
                "each process would keep its own idempotency records and rate limits",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        from gateway.workers import run_workers

        return run_workers(args.workers, args.config, args.host, args.port, latch=latch)
    setup_logging(config.logging.level, config.logging.format)
    server = config.server
    listen = Listen(
        args.host or server.host,
        args.port or server.port,
        server.admin_port,
        reuse_port=args.reuse_port,
        metrics_dir=args.metrics_dir,
    )
    try:
        _run(serve(config, resolve_config_path(args.config), listen, latch=latch))
    except OSError as exc:  # the port is taken, or the address is not this host's
        print(f"gateway: cannot listen on {listen.host}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def _map(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_CONFIG
    _, runtime = loaded
    route = runtime.routes.get(args.partner)
    if route is None:
        print(f"gateway: no [partners.{args.partner}] in the configuration", file=sys.stderr)
        return EXIT_CONFIG
    try:
        body = parse_json_object(args.file.read_bytes())
        order = prepare_order(
            body, route, idempotency_key=None, max_pdf_bytes=runtime.config.pdf.max_bytes
        )
    except OSError as exc:
        print(f"gateway: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        problem: dict[str, object] = {"error": exc.code, "message": exc.message}
        if exc.details:
            problem["details"] = exc.details
        print(json.dumps(problem, indent=2, ensure_ascii=False))
        return EXIT_INVALID
    print(json.dumps(order.envelope, indent=2, ensure_ascii=False))
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_CONFIG
    config, _ = loaded
    print(f"configuration ok ({config.digest[:16]})")
    proxy = config.manager.proxy.get_secret_value() if config.manager.proxy else None
    via = describe_proxy(proxy)  # never the proxy's credentials
    print(f"manager: {config.manager.base_url} (api {config.manager.api}, {via})")
    for name, shop in config.shops.items():
        hosts = ", ".join(shop.hosts) or "any host"
        org_keys = ", accepts org keys" if shop.accept_org_keys else ""
        api = config.api_for(shop)
        print(f"shop {name}: org {shop.org_id}, shop {shop.shop_id}, api {api}, {hosts}{org_keys}")
    for name, partner in config.partners.items():
        profile = f", profile {partner.profile}" if partner.profile else ""
        rate = f", {partner.rate_per_min}/min" if partner.rate_per_min else ""
        callback = ", callbacks on" if partner.callback_url else ""
        print(f"partner {name}: shop {partner.shop}, pdf {partner.pdf}{profile}{rate}{callback}")
    outbox = config.outbox
    if outbox.enabled:
        where = "redis" if config.state.backend == "redis" else outbox.path
        print(
            f"outbox: {where}, {len(outbox.keys)} key(s), max age {outbox.max_age_hours:g} h, "
            f"retries {outbox.retry_min_s:g}-{outbox.retry_max_s:g} s"
        )
    if config.webhooks.enabled:
        subscribed = [name for name, shop in config.shops.items() if shop.webhook_secret]
        print(
            "webhooks: POST /webhooks/pharmaone, subscribed shops: "
            f"{', '.join(subscribed) or 'none'}"
        )
    return EXIT_OK


def _new_key(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(32)
    print(f"key:        {key}")
    print(f"key_sha256: {hash_key(key)}")
    return EXIT_OK


def _hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("gateway: no key on stdin", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_key(key))
    return EXIT_OK


def _new_secret(args: argparse.Namespace) -> int:
    if args.kind == "outbox":
        from gateway.outbox.sealing import new_key

        print(new_key())
    else:
        print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii"))
    return EXIT_OK


def _outbox(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_CONFIG
    config, _ = loaded
    if not config.outbox.enabled:
        print("gateway: the outbox is not enabled ([outbox] enabled = false)", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging("warning", "text", stream=sys.stderr)  # stdout is the command's answer
    return asyncio.run(_outbox_action(args, config))


async def _outbox_action(args: argparse.Namespace, config: Config) -> int:
    from gateway.outbox.actions import drop_order, retry_order
    from gateway.outbox.factory import create_outbox_store, open_outbox_store

    store = create_outbox_store(config, owner=False)
    try:
        problem = await open_outbox_store(store)
        if problem is not None:
            print(f"gateway: the outbox cannot be used: {problem}", file=sys.stderr)
            return EXIT_FAILED
        now = time.time()
        if args.action == "list":
            status = OrderStatus(args.status) if args.status else None
            entries = await store.list_entries(status, limit=args.limit)
            print(format_entries(entries, now, as_json=args.json))
            return EXIT_OK
        if args.action == "retry":
            done = await retry_order(store, config.outbox, args.partner, args.reference, now)
            what = "queued again" if done else "not retried: no failed order with this reference"
        else:
            done = await drop_order(store, args.partner, args.reference, now)
            what = (
                "dropped" if done else "not dropped: no queued or failed order with this reference"
            )
        print(f"{args.partner} {args.reference}: {what}")
        return EXIT_OK if done else EXIT_FAILED
    except GatewayError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()


def format_entries(entries: Sequence[LedgerEntry], now: float, *, as_json: bool) -> str:
    """The ledger as a table for people, or as JSON (no customer data either way)."""
    if as_json:
        documents = [{"partner": entry.partner, **build_status(entry)} for entry in entries]
        return json.dumps(documents, indent=2, ensure_ascii=False)
    rows = [("REFERENCE", "PARTNER", "STATUS", "ATTEMPTS", "AGE", "LAST ERROR")]
    rows += [
        (
            entry.reference,
            entry.partner,
            entry.status.value,
            str(entry.attempts),
            format_age(now - entry.created_at),
            entry.last_error or "-",
        )
        for entry in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_age(seconds: float) -> str:
    """``42s``, ``17m``, ``5h``, ``3d``: how long ago, roughly."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _sandbox(args: argparse.Namespace) -> int:
    from gateway.sandbox import WebhookSink, run_sandbox

    sink = None
    if args.webhook_url:
        secret = read_env_secret(SANDBOX_SECRET_ENV)
        if secret is None:
            print(
                f"gateway: --webhook-url needs the signing secret in ${SANDBOX_SECRET_ENV}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        sink = WebhookSink(args.webhook_url, secret.encode())
    run_sandbox(args.host, args.port, sink)
    return EXIT_OK
