"""The HTTP edge of every request: request id, timing, request log, and GatewayError → JSON.

This is the only place that builds error responses; aiohttp's own 404/405/413 are rendered here
too, so a partner never sees anything but the contract's JSON error.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from gateway.errors import (
    GatewayError,
    MethodNotAllowedError,
    NotFoundError,
    PartnerError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from gateway.observability import (
    Metrics,
    RequestLog,
    bind_log_context,
    close_log_context,
    current_log_fields,
    log_event,
    open_log_context,
)

REQUEST_ID_HEADER: Final = "X-Request-ID"
_SAFE_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_request_id(incoming: str | None) -> str:
    """The caller's id when it is safe to echo and log; a fresh one otherwise."""
    if incoming and _SAFE_REQUEST_ID.match(incoming):
        return incoming
    return secrets.token_hex(16)


def error_response(error: GatewayError, request_id: str) -> web.Response:
    body: dict[str, object] = {
        "error": error.code,
        "message": error.message,
        "request_id": request_id,
    }
    if error.details:
        body["details"] = error.details
    response = web.json_response(body, status=error.http_status, headers=error.headers)
    if error.closes_connection:
        response.force_close()
    return response


_KEPT_HEADERS: Final = ("Allow",)
_HTTP_ERRORS: Final[dict[int, type[PartnerError]]] = {
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
}


def to_gateway_error(exc: web.HTTPException) -> GatewayError:
    """aiohttp's own HTTP errors (routing, body size) as the contract's errors."""
    # aiohttp's headers that tell the client what to do (Allow on a 405) are kept.
    headers = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
    cls = _HTTP_ERRORS.get(exc.status)
    if cls is not None:
        return cls(headers=headers)
    return PartnerError(exc.reason, status=exc.status, headers=headers)


def create_middleware(
    metrics: Metrics | None, request_log: RequestLog | None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware for the partner app (with metrics and the request log) or the admin app
    (``metrics=None``: operators' and probes' requests are neither counted nor logged)."""

    # One coroutine per request around the handler (no context manager, no inner coroutine):
    # this runs on every request.
    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = build_request_id(request.headers.get(REQUEST_ID_HEADER))
        started = time.perf_counter()
        context = open_log_context(request_id=request_id)
        try:
            if metrics is not None:
                metrics.in_flight.inc()
            try:
                response = await handler(request)
            except GatewayError as exc:
                response = render_error(exc, request_id)
            except web.HTTPException as exc:
                response = render_error(to_gateway_error(exc), request_id)
            except asyncio.CancelledError:
                raise  # the client went away; aiohttp finishes the task
            except Exception:
                log_event(40, "internal_error", exc_info=True)
                response = render_error(GatewayError(), request_id)
            finally:
                if metrics is not None:
                    metrics.in_flight.dec()
            response.headers[REQUEST_ID_HEADER] = request_id
            if metrics is not None:
                elapsed = time.perf_counter() - started
                # The handler bound the partner (and upstream status) into the log context.
                partner = str(current_log_fields().get("partner", "unknown"))
                metrics.count_request(partner, response.status, elapsed)
                if request_log is not None:
                    request_log.write(
                        method=request.method, path=request.path,
                        status=response.status, duration_ms=round(elapsed * 1000, 2),
                    )  # fmt: skip
        finally:
            close_log_context(context)
        return response

    return gateway_middleware


def render_error(error: GatewayError, request_id: str) -> web.Response:
    """The contract's JSON error for a failed request (logged when it is the gateway's fault)."""
    bind_log_context(code=error.code)
    if error.http_status >= 500:
        log_event(40, "request_failed", code=error.code, status=error.http_status)
    return error_response(error, request_id)
