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
    current_log_fields,
    log_context,
    log_event,
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

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = build_request_id(request.headers.get(REQUEST_ID_HEADER))
        started = time.perf_counter()
        with log_context(request_id=request_id):
            if metrics is not None:
                metrics.in_flight.inc()
            try:
                response = await _answer(request, handler, request_id)
            finally:
                if metrics is not None:
                    metrics.in_flight.dec()
            response.headers[REQUEST_ID_HEADER] = request_id
            if metrics is not None:
                elapsed = time.perf_counter() - started
                # The handler bound the partner (and upstream status) into the log context.
                partner = str(current_log_fields().get("partner", "unknown"))
                metrics.requests.labels(partner=partner, code=str(response.status)).inc()
                metrics.request_duration.observe(elapsed)
                if request_log is not None:
                    request_log.write(
                        method=request.method, path=request.path,
                        status=response.status, duration_ms=round(elapsed * 1000, 2),
                    )  # fmt: skip
        return response

    return gateway_middleware


async def _answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        error = exc
    except web.HTTPException as exc:
        error = to_gateway_error(exc)
    except asyncio.CancelledError:
        raise  # the client went away; aiohttp finishes the task
    except Exception:
        log_event(40, "internal_error", exc_info=True)
        error = GatewayError()
    bind_log_context(code=error.code)
    if error.http_status >= 500:
        log_event(40, "request_failed", code=error.code, status=error.http_status)
    return error_response(error, request_id)
