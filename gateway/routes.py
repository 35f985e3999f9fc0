"""Thin handlers: the partner's order endpoint, and the admin endpoints for operators and probes."""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.errors import (
    InvalidSignatureError,
    NotFoundError,
    RateLimitedError,
    StateUnavailableError,
)
from gateway.gateway import GATEWAY_KEY
from gateway.intake import read_body, read_intake
from gateway.ledger import to_status_document
from gateway.manager import OrgKeyRefusedError
from gateway.observability import bind_log_context, current_log_fields, log_event
from gateway.orders import deliver_order, prepare_order
from gateway.outbox import WebhookResult
from gateway.outbox.deliverer import build_status_path
from gateway.retry import to_retry_after_header
from gateway.webhooks import DELIVERY_HEADER, MAX_BODY_BYTES, SIGNATURE_HEADER, accept_webhook
from gateway.webhooks import PATH as WEBHOOK_PATH

ORDER_PATH: Final = "/api/v1/external-order"
OPENAPI_PATH: Final = "/api/v1/openapi.json"
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
            max_pdf_bytes=runtime.config.pdf.max_bytes, outbox=gateway.outbox,
            request_id=str(current_log_fields().get("request_id")),
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
    if reply.status == 202:  # stored by the outbox (section 9): where to ask what became of it
        response.headers["Location"] = build_status_path(order.reference)
    return response


async def order_status(request: web.Request) -> web.Response:
    """``GET /api/v1/external-order/{external_reference}``: the order's ledger entry (section 10).

    Another partner's reference is answered exactly like one that never existed.
    """
    gateway = request.app[GATEWAY_KEY]
    caller = gateway.runtime.registry.resolve(presented_key(request), request.host)
    bind_log_context(partner=caller.name, shop=caller.shop.name)
    if gateway.outbox is None:
        raise NotFoundError("Order status needs the gateway's outbox, which is off here.")
    reference = request.match_info["external_reference"]
    entry = await gateway.outbox.store.get(caller.name, reference)
    if entry is None:
        raise NotFoundError("No order with this external_reference was received from you.")
    return web.json_response(body=to_status_document(entry))


async def pharmaone_webhook(request: web.Request) -> web.Response:
    """``POST /webhooks/pharmaone``: Manager's event, verified, recorded, relayed (section 11).

    Answered only after the write is committed, so Manager may always send it again.
    """
    gateway = request.app[GATEWAY_KEY]
    runtime, outbox, callbacks = gateway.runtime, gateway.outbox, gateway.callbacks
    config = runtime.config
    if outbox is None or callbacks is None or not config.webhooks.enabled:
        raise NotFoundError("Manager's webhooks are not enabled on this gateway.")
    body = await read_body(request, MAX_BODY_BYTES, config.server.read_timeout_s)
    received = gateway.metrics.webhooks_received
    try:
        result = await accept_webhook(
            outbox.store, body, signature=request.headers.get(SIGNATURE_HEADER),
            delivery_id=request.headers.get(DELIVERY_HEADER), secrets=runtime.webhook_secrets,
            partners_of=runtime.partners_of_org,
            callback_partners=frozenset(runtime.callbacks), now=callbacks.clock(),
            dedupe_s=config.webhooks.dedupe_s, callback_max_age_s=config.outbox.max_age_s,
        )  # fmt: skip
    except InvalidSignatureError:
        received.labels(result="invalid_signature").inc()
        raise
    received.labels(result=result.value).inc()
    log_event(20, "webhook_received", result=result.value)
    if result is WebhookResult.ACCEPTED:
        callbacks.wake()
    return web.json_response({"status": result.value})


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
    gateway = request.app[GATEWAY_KEY]
    if gateway.outbox is not None:
        try:
            await gateway.outbox.refresh_metrics()
        except StateUnavailableError:
            pass  # the gauges keep their last values; /readyz tells the store is down
    response = web.Response(body=gateway.metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def load_openapi_document() -> bytes:
    """The published OpenAPI document, packaged inside ``gateway`` (so in every install)."""
    return resources.files("gateway").joinpath("openapi.json").read_bytes()


def add_order_routes(app: web.Application) -> None:
    document = load_openapi_document()

    async def openapi(request: web.Request) -> web.Response:
        """``GET /api/v1/openapi.json``: the partner API's description; no key needed."""
        return web.Response(body=document, content_type="application/json")

    app.router.add_get(OPENAPI_PATH, openapi)
    app.router.add_post(ORDER_PATH, external_order)
    app.router.add_post(ORDER_PATH + "/", external_order)
    app.router.add_get(ORDER_PATH + "/{external_reference}", order_status)
    app.router.add_post(WEBHOOK_PATH, pharmaone_webhook)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
