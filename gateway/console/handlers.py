"""The console's HTTP edge on the admin port: ``GET /``, login, logout, Retry and Drop (thin).

Refusals are :class:`ForbiddenError` and friends, rendered as the contract's JSON error by the
middleware; pages and redirects carry the console's security headers.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from typing import Final

from aiohttp import web

from gateway import __version__
from gateway.console.access import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    build_csrf,
    build_session,
    is_operator_token,
    is_valid_csrf,
    is_valid_session,
)
from gateway.console.page import PageRenderer
from gateway.console.view import (
    ConsoleFacts,
    OutboxFacts,
    TokenFact,
    build_page,
    to_notice,
)
from gateway.errors import ForbiddenError, NotFoundError, StateUnavailableError
from gateway.gateway import GATEWAY_KEY, Gateway
from gateway.observability import log_event
from gateway.outbox import OrderStatus
from gateway.outbox.actions import drop_order, retry_order
from gateway.outbox.deliverer import Outbox

RENDERER_KEY: Final = web.AppKey("console_renderer", PageRenderer)
FAILED_SHOWN: Final = 50
LATEST_SHOWN: Final = 20


async def console_page(request: web.Request) -> web.Response:
    """``GET /``: the console, or the login form when a token is set and no session is."""
    gateway, renderer = request.app[GATEWAY_KEY], request.app[RENDERER_KEY]
    token, now = _operator_token(gateway), gateway.clock()
    notice = to_notice(request.query.get("notice"))
    session = request.cookies.get(SESSION_COOKIE)
    if token is not None and not is_valid_session(session, token, now):
        return _page(renderer, renderer.render_login(notice=notice))
    csrf = build_csrf(token, session) if token is not None and session else None
    page = build_page(await load_facts(gateway, now), now)
    return _page(renderer, renderer.render_console(page, notice=notice, csrf=csrf))


async def login(request: web.Request) -> web.Response:
    """``POST /console/login``: the operator's token in, a session cookie out."""
    gateway, renderer = request.app[GATEWAY_KEY], request.app[RENDERER_KEY]
    token = _operator_token(gateway)
    if token is None:
        raise ForbiddenError("This console has no operator token configured: it is read-only.")
    presented = (await request.post()).get("token")
    if not isinstance(presented, str) or not is_operator_token(presented, token):
        log_event(30, "console_login_refused")
        return _redirect(renderer, "login_failed")
    response = _redirect(renderer, None)
    response.set_cookie(
        SESSION_COOKIE, build_session(token, gateway.clock(), secrets.token_hex(16)),
        max_age=SESSION_MAX_AGE_S, path="/", httponly=True, samesite="Strict",
        secure=request.secure,
    )  # fmt: skip
    log_event(20, "console_login")
    return response


async def logout(request: web.Request) -> web.Response:
    """``POST /console/logout``: the session cookie is cleared."""
    await _authorize(request)
    response = _redirect(request.app[RENDERER_KEY], "logged_out")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def outbox_retry(request: web.Request) -> web.Response:
    """``POST /console/outbox/retry``: what ``gateway outbox retry`` does."""
    gateway = request.app[GATEWAY_KEY]
    partner, reference = await _order_of(request)
    outbox = _outbox(gateway)
    done = await retry_order(outbox.store, outbox.config, partner, reference, gateway.clock())
    return _redirect(request.app[RENDERER_KEY], "retried" if done else "unchanged")


async def outbox_drop(request: web.Request) -> web.Response:
    """``POST /console/outbox/drop``: what ``gateway outbox drop`` does."""
    gateway = request.app[GATEWAY_KEY]
    partner, reference = await _order_of(request)
    done = await drop_order(_outbox(gateway).store, partner, reference, gateway.clock())
    return _redirect(request.app[RENDERER_KEY], "dropped" if done else "unchanged")


async def load_facts(gateway: Gateway, now: float) -> ConsoleFacts:
    """What the page shows, read from the gateway's services (the state store, the outbox)."""
    config = gateway.runtime.config
    outbox_facts: OutboxFacts | None = None
    if gateway.outbox is not None:
        store = gateway.outbox.store
        try:
            outbox_facts = OutboxFacts(
                stats=await store.stats(),
                failed=await store.list_entries(OrderStatus.FAILED, FAILED_SHOWN),
                latest=await store.list_entries(None, LATEST_SHOWN),
            )
        except StateUnavailableError:
            outbox_facts = None
    backend: str = config.state.backend
    if config.outbox.enabled and backend == "memory":
        backend = "sqlite (the outbox's file)"
    return ConsoleFacts(
        version=__version__,
        config_digest=gateway.config_digest,
        created_at=gateway.created_at,
        pid=os.getpid(),
        worker=gateway.metrics.multiprocess_dir is not None,
        backend=backend,
        state_ok=await gateway.state.ping(),
        upstream=replace(gateway.metrics.upstream),  # a copy: the page shows one moment
        tokens=build_token_facts(gateway),
        outbox_enabled=gateway.outbox is not None,
        outbox=outbox_facts,
        requests=gateway.request_log.recent(),
    )


def build_token_facts(gateway: Gateway) -> list[TokenFact]:
    """Each org credential of the configuration, with its cached token's expiry (if any)."""
    config = gateway.runtime.config
    shops_by_credential: dict[tuple[str, str, str], list[str]] = {}
    for name, shop in config.shops.items():
        if shop.manager_key is not None:
            slot = (shop.org_id, config.api_for(shop), shop.manager_key.get_secret_value())
            shops_by_credential.setdefault(slot, []).append(name)
    client = gateway.manager_client
    return [
        TokenFact(
            org_id=org_id,
            shops=tuple(shops),
            api=api,
            expires_at=client.tokens.expiry_of(org_id, key) if client and api == "v2" else None,
        )
        for (org_id, api, key), shops in shops_by_credential.items()
    ]


def add_console_routes(app: web.Application) -> None:
    app[RENDERER_KEY] = PageRenderer()
    app.router.add_get("/", console_page)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_post("/console/outbox/retry", outbox_retry)
    app.router.add_post("/console/outbox/drop", outbox_drop)


def _operator_token(gateway: Gateway) -> str | None:
    secret = gateway.runtime.config.server.admin_token
    return None if secret is None else secret.get_secret_value()


async def _authorize(request: web.Request) -> dict[str, str]:
    """The action's form fields, once the session and the form's CSRF token are checked.

    Raises:
        ForbiddenError: no operator token configured (read-only), no session, or a bad CSRF.
    """
    gateway = request.app[GATEWAY_KEY]
    token = _operator_token(gateway)
    if token is None:
        raise ForbiddenError("This console has no operator token configured: it is read-only.")
    session = request.cookies.get(SESSION_COOKIE)
    if session is None or not is_valid_session(session, token, gateway.clock()):
        raise ForbiddenError()
    form = {name: value for name, value in (await request.post()).items() if isinstance(value, str)}
    if not is_valid_csrf(form.get("csrf"), token, session):
        raise ForbiddenError("The form is stale or not from this console; reload the page.")
    return form


async def _order_of(request: web.Request) -> tuple[str, str]:
    form = await _authorize(request)
    return form.get("partner", ""), form.get("external_reference", "")


def _outbox(gateway: Gateway) -> Outbox:
    if gateway.outbox is None:
        raise NotFoundError("The outbox is off on this gateway: there is nothing to retry or drop.")
    return gateway.outbox


def _page(renderer: PageRenderer, html: str) -> web.Response:
    response = web.Response(text=html, content_type="text/html", charset="utf-8")
    response.headers.update(renderer.headers)
    return response


def _redirect(renderer: PageRenderer, notice: str | None) -> web.Response:
    """303 back to the page (a reload does not post the form again), with a notice code."""
    location = "/" if notice is None else f"/?notice={notice}"
    response = web.Response(status=303, headers={"Location": location})
    response.headers.update(renderer.headers)
    return response
