"""The ``gateway`` command: serve, map, check-config, new-key, hash-key, sandbox."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from gateway.auth import hash_key
from gateway.config import Config, load_config, read_env_secret, resolve_config_path
from gateway.errors import ConfigError, GatewayError
from gateway.intake import parse_json_object
from gateway.observability import setup_logging
from gateway.orders import prepare_order
from gateway.runtime import Runtime, build_runtime

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "serve": _serve,
        "map": _map,
        "check-config": _check_config,
        "new-key": _new_key,
        "hash-key": _hash_key,
        "sandbox": _sandbox,
    }[args.command]
    return handler(args)


def _load(path: str | None) -> tuple[Config, Runtime] | None:
    try:
        config = load_config(resolve_config_path(path))
        return config, build_runtime(config)
    except ConfigError as exc:
        print(f"gateway: configuration refused: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
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

        return run_workers(args.workers, args.config, args.host, args.port)
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
        _run(serve(config, resolve_config_path(args.config), listen))
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
    print(f"manager: {config.manager.base_url} (api {config.manager.api})")
    for name, shop in config.shops.items():
        hosts = ", ".join(shop.hosts) or "any host"
        org_keys = ", accepts org keys" if shop.accept_org_keys else ""
        api = config.api_for(shop)
        print(f"shop {name}: org {shop.org_id}, shop {shop.shop_id}, api {api}, {hosts}{org_keys}")
    for name, partner in config.partners.items():
        profile = f", profile {partner.profile}" if partner.profile else ""
        rate = f", {partner.rate_per_min}/min" if partner.rate_per_min else ""
        print(f"partner {name}: shop {partner.shop}, pdf {partner.pdf}{profile}{rate}")
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
