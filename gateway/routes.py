"""Thin handlers: the partner's order endpoint, and the admin endpoints for operators and probes."""

from __future__ import annotations

from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.errors import RateLimitedError
from gateway.gateway import GATEWAY_KEY
from gateway.intake import read_intake
from gateway.manager import OrgKeyRefusedError
from gateway.observability import bind_log_context
from gateway.orders import deliver_order, prepare_order
from gateway.retry import to_retry_after_header

ORDER_PATH: Final = "/api/v1/external-order"
KEY_HEADERS: Final = ("apikey", "X-API-Key")
REPLAYED_HEADER: Final = "Idempotent-Replayed"


def presented_key(request: web.Request) -> str | None:
    """The partner's key from ``apikey``, ``X-API-Key`` or ``?apikey=`` (in that order)."""
    for name in KEY_HEADERS:
        value = request.headers.get(name)
        if value:
            return value.strip()
    return request.query.get("apikey") or None


async def external_order(request: web.Request) -> web.Response:
    """``POST /api/v1/external-order``: authenticate, read, map, validate, forward."""
    gateway = request.app[GATEWAY_KEY]
    # One read of each: the whole request runs on the configuration it started with.
    runtime, manager, pdf = gateway.runtime, gateway.manager, gateway.pdf
    # Authentication and the rate limit come before the body is read: cheap refusals first.
    caller = runtime.registry.resolve(presented_key(request), request.host)
    bind_log_context(partner=caller.name, shop=caller.shop.name)
    route = runtime.route_for(caller)
    if route.rate_per_min is not None:
        wait_s = await gateway.state.take(f"rate:{caller.name}", route.rate_per_min)
        if wait_s > 0:
            raise RateLimitedError(to_retry_after_header(wait_s))
    server = runtime.config.server
    intake = await read_intake(request, server.max_body_bytes, server.read_timeout_s)
    order = prepare_order(
        intake.body,
        route,
        idempotency_key=request.headers.get("Idempotency-Key"),
        prescription=intake.prescription,
        max_pdf_bytes=runtime.config.pdf.max_bytes,
    )
    try:
        delivery = await deliver_order(
            order, route, store=gateway.state, manager=manager, pdf=pdf,
            ttl_s=runtime.config.idempotency.ttl_hours * 3600,
            lease_s=runtime.config.claim_lease_s,
            max_pdf_bytes=runtime.config.pdf.max_bytes,
        )  # fmt: skip
    except OrgKeyRefusedError:
        assert caller.org_key is not None
        runtime.registry.remember_refusal(caller.org_key)
        raise
    reply = delivery.reply
    response = web.Response(
        status=reply.status, body=reply.body, content_type=reply.content_type or "application/json"
    )
    if delivery.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    if gateway.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not gateway.started:
        return web.json_response({"status": "starting"}, status=503)
    if not await gateway.state.ping():
        return web.json_response({"status": "state_unavailable"}, status=503)
    return web.json_response({"status": "ready", "config": gateway.config_digest})


async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=request.app[GATEWAY_KEY].metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_order_routes(app: web.Application) -> None:
    app.router.add_post(ORDER_PATH, external_order)
    app.router.add_post(ORDER_PATH + "/", external_order)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
