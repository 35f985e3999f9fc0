"""A local stand-in for PharmaOne Manager: token exchange, v1/v2 order-requests, scripted faults.

It imitates a foreign system, so it uses only aiohttp's server, PyJWT and the stdlib, nothing else
from ``gateway``. It is the upstream of the demo (``gateway sandbox``) and of integration tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler

DEMO_ORG_ID: Final = "demo-org"
DEMO_SHOP_ID: Final = "demo-shop"
DEMO_ORG_KEY: Final = "demo-org-key-not-a-secret"
ALL_SCOPES: Final[tuple[str, ...]] = (
    "orders.read",
    "orders.write",
    "order_requests.write",
    "prescriptions.read",
    "prescriptions.write",
    "products.read",
    "products.write",
    "inventory.read",
    "inventory.write",
    "reports.read",
)
WRITE_SCOPE: Final = "order_requests.write"
ISSUER: Final = "pharmaone-integration"
DEFAULT_FAULT_BODY: Final[Mapping[str, object]] = {"error": "sandbox_fault"}

FaultEndpoint = Literal["order-requests", "token"]
_ORG_PATH: Final = "/api/{api}/public/orgs/{{org_id}}"
_FAULT_FIELDS: Final = frozenset({"status", "body", "retry_after", "delay_s", "endpoint", "drop"})


@dataclass(frozen=True)
class SandboxOrg:
    """One Manager organisation: its shops, its integration keys and the scopes its tokens get."""

    org_id: str
    shops: frozenset[str]
    keys: frozenset[str]
    scopes: tuple[str, ...] = ALL_SCOPES


@dataclass
class Fault:
    """A scripted failure for the next request to ``endpoint``; faults are consumed in order."""

    status: int
    body: dict[str, object] | None = None
    retry_after: str | None = None
    delay_s: float = 0.0
    endpoint: FaultEndpoint = "order-requests"
    drop: bool = False


@dataclass
class SandboxState:
    """What the sandbox knows and what it has seen; tests read and script it directly."""

    orgs: dict[str, SandboxOrg]
    received: list[dict[str, object]] = field(default_factory=list)
    token_requests: int = 0
    order_request_attempts: int = 0
    faults: list[Fault] = field(default_factory=list)
    # While set, every Manager endpoint answers it (until DELETE /_sandbox/outage).
    outage: Fault | None = None
    token_ttl_s: int = 3600


SANDBOX_KEY: Final = web.AppKey("sandbox", SandboxState)


def find_envelope_problem(envelope: Mapping[str, object], shops: frozenset[str]) -> str | None:
    """Manager's validation of an order-request envelope: the first problem, or None if valid."""
    payload = envelope.get("payload")
    if not isinstance(payload, dict):
        return "payload is required"
    shop_id = payload.get("shop_id")
    if not _is_text(shop_id):
        return "shop_id is required"
    if shop_id not in shops:
        return "shop_id does not belong to this organisation"
    if not (_is_text(payload.get("customer_name")) or _is_text(payload.get("customer_email"))):
        return "customer_name or customer_email is required"
    return _find_items_problem(payload)


def _find_items_problem(payload: Mapping[str, object]) -> str | None:
    items = payload.get("items")
    if items is None or items == []:
        has_prescription = _is_text(payload.get("prescription_pdf_base64")) or _is_text(
            payload.get("prescription_pdf_url")
        )
        if has_prescription:
            return None
        return "items are required unless prescription_pdf_base64 or prescription_pdf_url is given"
    if not isinstance(items, list):
        return "items must be a list"
    for index, line in enumerate(items):
        if not _is_valid_line(line):
            return f"items[{index}] needs quantity > 0 and one of name, p1_id, product_id"
    return None


def _is_valid_line(line: object) -> bool:
    if not isinstance(line, dict):
        return False
    quantity = line.get("quantity")
    # bool is an int in Python, but `true` is not a quantity in JSON.
    if isinstance(quantity, bool) or not isinstance(quantity, int | float):
        return False
    if not (math.isfinite(quantity) and quantity > 0):
        return False
    return _is_text(line.get("name")) or any(
        _is_identifier(line.get(k)) for k in ("p1_id", "product_id")
    )


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_identifier(value: object) -> bool:
    # Partners send PharmaOne product ids both as "12345" and as 12345.
    return _is_text(value) or (isinstance(value, int) and not isinstance(value, bool))


def _parse_faults(data: object) -> list[Fault]:
    """Faults from ``POST /_sandbox/faults`` (a list or one object); ValueError if malformed."""
    items = data if isinstance(data, list) else [data]
    return [_parse_fault(item) for item in items]


def _parse_fault(item: object) -> Fault:
    if not isinstance(item, dict):
        raise ValueError("each fault must be a JSON object")
    unknown = set(item) - _FAULT_FIELDS
    if unknown:
        raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
    status, body, retry_after = item.get("status"), item.get("body"), item.get("retry_after")
    delay_s, endpoint, drop = item.get("delay_s", 0), item.get("endpoint"), item.get("drop", False)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError("status must be an HTTP status between 200 and 599")
    if body is not None and not isinstance(body, dict):
        raise ValueError("body must be a JSON object or null")
    if retry_after is not None and not isinstance(retry_after, str):
        raise ValueError("retry_after must be a string or null")
    if isinstance(delay_s, bool) or not isinstance(delay_s, int | float):
        raise ValueError("delay_s must be a number >= 0")
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise ValueError("delay_s must be a number >= 0")
    if endpoint not in (None, "order-requests", "token"):
        raise ValueError("endpoint must be 'order-requests' or 'token'")
    if not isinstance(drop, bool):
        raise ValueError("drop must be a boolean")
    target: FaultEndpoint = "token" if endpoint == "token" else "order-requests"
    return Fault(status, body, retry_after, float(delay_s), target, drop)


def _kong_refusal(status: int, message: str) -> web.Response:
    # Manager's own API gateway (Kong) answers these before the backend: no "error" field.
    return web.json_response({"message": message, "request_id": str(uuid.uuid4())}, status=status)


def _error(status: int, error: str, message: str | None = None) -> web.Response:
    body = {"error": error} if message is None else {"error": error, "message": message}
    return web.json_response(body, status=status)


def _org_mismatch() -> web.Response:
    return _error(403, "org_mismatch", "Token org_id does not match URL orgId")


def _backend_unauthorized() -> web.Response:
    return _error(401, "Invalid or missing API key")


class _Manager:
    """The request handlers, bound to one app's state, signing secret and clock."""

    def __init__(self, state: SandboxState, secret: bytes, clock: Callable[[], float]) -> None:
        self.state = state
        self.secret = secret
        self.clock = clock

    async def exchange_token(self, request: web.Request) -> web.StreamResponse:
        self.state.token_requests += 1
        faulted = await self._answer_fault(request, "token")
        if faulted is not None:
            return faulted
        org = self._authorize_key(request, allow_query=True)
        if isinstance(org, web.Response):
            return org
        now = int(self.clock())
        claims = {
            "org_id": org.org_id,
            "scopes": list(org.scopes),
            "iss": ISSUER,
            "sub": "integration",
            "iat": now,
            "exp": now + self.state.token_ttl_s,
        }
        return web.json_response(
            {
                "access_token": jwt.encode(claims, self.secret, algorithm="HS256"),
                "token_type": "Bearer",
                "expires_in": self.state.token_ttl_s,
            }
        )

    async def order_request_v1(self, request: web.Request) -> web.StreamResponse:
        return await self._order_request(request, "v1")

    async def order_request_v2(self, request: web.Request) -> web.StreamResponse:
        return await self._order_request(request, "v2")

    async def _order_request(
        self, request: web.Request, api: Literal["v1", "v2"]
    ) -> web.StreamResponse:
        self.state.order_request_attempts += 1
        faulted = await self._answer_fault(request, "order-requests")
        if faulted is not None:
            return faulted
        if api == "v1":
            org = self._authorize_key(request, allow_query=False)
        else:
            org = self._authorize_bearer(request)
        if isinstance(org, web.Response):
            return org
        try:
            envelope = json.loads(await request.read())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            envelope = None
        if not isinstance(envelope, dict):
            return _error(400, "invalid_body", "The request body must be a JSON object.")
        problem = find_envelope_problem(envelope, org.shops)
        if problem is not None:
            return _error(400, "validation_error", problem)
        request_id = str(uuid.uuid4())
        self.state.received.append(
            {
                "id": request_id,
                "org_id": org.org_id,
                "api": api,
                "envelope": envelope,
                "received_at": datetime.fromtimestamp(self.clock(), UTC).isoformat(),
            }
        )
        return web.json_response(
            {
                "id": request_id,
                "external_reference": envelope.get("external_reference"),
                "message": "Order request received.",
                "status": "pending",
            }
        )

    def _authorize_key(
        self, request: web.Request, *, allow_query: bool
    ) -> SandboxOrg | web.Response:
        key = request.headers.get("apikey") or request.headers.get("X-API-Key")
        if not key and allow_query:
            key = request.query.get("apikey")
        if not key:
            return _kong_refusal(401, "No API key found in request")
        org = next((o for o in self.state.orgs.values() if key in o.keys), None)
        if org is None:
            return _kong_refusal(401, "Unauthorized")
        if org.org_id != request.match_info["org_id"]:
            return _org_mismatch()
        return org

    def _authorize_bearer(self, request: web.Request) -> SandboxOrg | web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        claims = self._decode_token(token.strip()) if scheme.lower() == "bearer" else None
        if claims is None:
            return _backend_unauthorized()
        org_id, scopes = claims["org_id"], claims["scopes"]
        if org_id != request.match_info["org_id"]:
            return _org_mismatch()
        if not isinstance(scopes, list) or WRITE_SCOPE not in scopes:
            return _error(403, "insufficient_scope", f"Missing scope: {WRITE_SCOPE}")
        org = self.state.orgs.get(str(org_id))
        return org if org is not None else _backend_unauthorized()

    def _decode_token(self, token: str) -> dict[str, object] | None:
        try:
            # Time claims are judged against the injected clock below, not PyJWT's real time.
            claims: dict[str, object] = jwt.decode(
                token,
                self.secret,
                algorithms=["HS256"],
                issuer=ISSUER,
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["exp", "org_id", "scopes"],
                },
            )
        except jwt.InvalidTokenError:
            return None
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float) or exp <= self.clock():
            return None
        return claims

    async def _answer_fault(
        self, request: web.Request, endpoint: FaultEndpoint
    ) -> web.StreamResponse | None:
        fault = self.state.outage
        if fault is None:
            fault = next((f for f in self.state.faults if f.endpoint == endpoint), None)
            if fault is None:
                return None
            self.state.faults.remove(fault)
        if fault.delay_s > 0:
            await asyncio.sleep(fault.delay_s)
        if fault.drop:
            # A closed socket with no status line is what a dying Manager pod looks like: the
            # client gets ServerDisconnectedError. aiohttp then fails to write the response we
            # return and treats it as a client disconnect, quietly.
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
        body = fault.body if fault.body is not None else DEFAULT_FAULT_BODY
        return web.json_response(body, status=fault.status, headers=headers)

    async def list_received(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "order_requests": self.state.received,
                "token_requests": self.state.token_requests,
                "order_request_attempts": self.state.order_request_attempts,
            }
        )

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self.state.received.clear()
        self.state.faults.clear()
        self.state.outage = None
        self.state.token_requests = 0
        self.state.order_request_attempts = 0
        return web.Response(status=204)

    async def start_outage(self, request: web.Request) -> web.StreamResponse:
        """Manager is down until ``DELETE /_sandbox/outage``: every call answers the fault
        (default ``503``), or has its connection closed with ``{"drop": true}``."""
        raw = await request.read()
        try:
            data = json.loads(raw) if raw.strip() else {}
            fault = _parse_fault({"status": 503, **data} if isinstance(data, dict) else data)
        except ValueError as exc:
            return _error(400, "invalid_body", str(exc))
        self.state.outage = fault
        return web.json_response({"outage": fault.status}, status=201)

    async def end_outage(self, request: web.Request) -> web.StreamResponse:
        self.state.outage = None
        return web.Response(status=204)

    async def add_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            faults = _parse_faults(json.loads(await request.read()))
        except ValueError as exc:
            return _error(400, "invalid_body", str(exc))
        self.state.faults.extend(faults)
        return web.json_response({"queued": len(self.state.faults)}, status=201)


SANDBOX_MAX_BODY: Final = 64 * 1024 * 1024

# A minimal valid PDF: what the demo's prescription URL serves (see config/demo.toml).
SAMPLE_PDF: Final = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)


async def _sample_pdf(request: web.Request) -> web.StreamResponse:
    """Stands in for a partner's document host, so the demo can show a PDF being fetched."""
    return web.Response(body=SAMPLE_PDF, content_type="application/pdf")


@web.middleware
async def _kong_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        # Kong answers unknown paths itself, before any backend sees them.
        return web.json_response({"message": "no Route matched with those values"}, status=404)


def create_sandbox_app(
    *,
    orgs: Iterable[SandboxOrg] | None = None,
    token_ttl_s: int = 3600,
    secret: bytes | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """A Manager stand-in serving ``orgs`` (default: the demo org); state in ``app[SANDBOX_KEY]``.

    Raises:
        ValueError: two orgs share an id or an integration key.
    """
    if orgs is None:
        orgs = [SandboxOrg(DEMO_ORG_ID, frozenset({DEMO_SHOP_ID}), frozenset({DEMO_ORG_KEY}))]
    org_list = list(orgs)
    by_id = {org.org_id: org for org in org_list}
    all_keys = [key for org in org_list for key in org.keys]
    if len(by_id) != len(org_list) or len(set(all_keys)) != len(all_keys):
        raise ValueError("sandbox orgs must have distinct org ids and distinct keys")
    state = SandboxState(orgs=by_id, token_ttl_s=token_ttl_s)
    manager = _Manager(state, secret if secret is not None else secrets.token_bytes(32), clock)
    # Manager documents no size limit; prescriptions of several MB arrive as base64.
    app = web.Application(middlewares=[_kong_not_found], client_max_size=SANDBOX_MAX_BODY)
    app[SANDBOX_KEY] = state
    v1, v2 = _ORG_PATH.format(api="v1"), _ORG_PATH.format(api="v2")
    app.router.add_post(f"{v2}/auth/token", manager.exchange_token)
    app.router.add_post(f"{v1}/order-requests", manager.order_request_v1)
    app.router.add_post(f"{v2}/order-requests", manager.order_request_v2)
    app.router.add_get("/_sandbox/order-requests", manager.list_received)
    app.router.add_delete("/_sandbox/order-requests", manager.reset)
    app.router.add_post("/_sandbox/faults", manager.add_faults)
    app.router.add_post("/_sandbox/outage", manager.start_outage)
    app.router.add_delete("/_sandbox/outage", manager.end_outage)
    app.router.add_get("/_sandbox/prescription.pdf", _sample_pdf)
    return app


def run_sandbox(host: str, port: int) -> None:
    """Serve the demo org on ``host:port`` until interrupted (``gateway sandbox``)."""
    # The key is documented and not secret, but printing keys is a habit this project avoids.
    sys.stderr.write(
        f"sandbox listening on http://{host}:{port} (org {DEMO_ORG_ID}, shop {DEMO_SHOP_ID})\n"
    )
    web.run_app(create_sandbox_app(), host=host, port=port, print=None, access_log=None)
