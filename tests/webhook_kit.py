"""What the webhook and callback tests share: a configuration with the outbox and webhooks on, a
partner's callback receiver on loopback, and Manager's signing of events."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from conftest import TomlValue, toml_table

from gateway.auth import hash_key
from gateway.config import Config, parse_config
from gateway.sandbox import DEMO_ORG_ID, DEMO_ORG_KEY, DEMO_SHOP_ID

OTHER_ORG = "other-org"
OTHER_SHOP = "other-shop"
OTHER_KEY = "other-org-key-for-webhook-tests"
OUTBOX_KEY = "jfLjzLGe-HIrxPPOAIs1C0t-ndrTEGMv-Gaihap62-M="  # a Fernet key for tests only
MAIN_SECRET = "main-subscription-secret-0123456789"
OTHER_SECRET = "other-subscription-secret-9876543210"
ALPHA_WHSEC = "whsec_" + base64.b64encode(b"alpha-callback-signing-key-32byte").decode()
GAMMA_WHSEC = "whsec_" + base64.b64encode(b"gamma-callback-signing-key-32byte").decode()
KEYS: Mapping[str, str] = {
    "alpha": "alpha-partner-key-for-webhooks-0123",
    "beta": "beta-partner-key-for-webhooks-45678",
    "gamma": "gamma-partner-key-for-webhooks-9abc",
}
ENVIRON: Mapping[str, str] = {
    "ORG_KEY": DEMO_ORG_KEY,
    "OTHER_KEY": OTHER_KEY,
    "OUTBOX_KEY": OUTBOX_KEY,
    "WH_MAIN": MAIN_SECRET,
    "WH_OTHER": OTHER_SECRET,
    "CB_ALPHA": ALPHA_WHSEC,
    "CB_GAMMA": GAMMA_WHSEC,
}
WEBHOOK_PATH = "/webhooks/pharmaone"
ORDER_PATH = "/api/v1/external-order"


def webhooks_toml(
    manager_url: str,
    outbox_path: Path,
    callback_url: str | None,
    *,
    webhooks: Mapping[str, TomlValue] | None = None,
    outbox: Mapping[str, TomlValue] | None = None,
    server: Mapping[str, TomlValue] | None = None,
    state: Mapping[str, TomlValue] | None = None,
) -> str:
    """Two orgs with a webhook subscription each; alpha (main) and gamma (other) listen for
    callbacks at ``callback_url``, beta (main) does not."""
    port = _port_of(callback_url)
    callback: dict[str, TomlValue] = (
        {"callback_url": callback_url, "callback_secret_env": "CB_ALPHA"} if callback_url else {}
    )
    gamma: dict[str, TomlValue] = (
        {"callback_url": callback_url, "callback_secret_env": "CB_GAMMA"} if callback_url else {}
    )
    tables = [
        toml_table("server", {"host": "127.0.0.1", "port": 0, "admin_port": 0, **(server or {})}),
        toml_table("manager", {"base_url": manager_url, "api": "v2", "timeout_s": 5, "retries": 0}),
        toml_table(
            "shops.main",
            {
                "org_id": DEMO_ORG_ID,
                "shop_id": DEMO_SHOP_ID,
                "manager_key_env": "ORG_KEY",
                "webhook_secret_env": "WH_MAIN",
            },
        ),
        toml_table(
            "shops.other",
            {
                "org_id": OTHER_ORG,
                "shop_id": OTHER_SHOP,
                "manager_key_env": "OTHER_KEY",
                "webhook_secret_env": "WH_OTHER",
            },
        ),
        toml_table(
            "partners.alpha", {"shop": "main", "key_sha256": hash_key(KEYS["alpha"]), **callback}
        ),
        toml_table("partners.beta", {"shop": "main", "key_sha256": hash_key(KEYS["beta"])}),
        toml_table(
            "partners.gamma", {"shop": "other", "key_sha256": hash_key(KEYS["gamma"]), **gamma}
        ),
        toml_table(
            "outbox",
            {
                "enabled": True,
                "path": str(outbox_path),
                "key_env": "OUTBOX_KEY",
                "retry_min_s": 1,
                "retry_max_s": 4,
                "max_age_hours": 1,
                **(outbox or {}),
            },
        ),
        toml_table(
            "webhooks",
            {
                "enabled": True,
                "callback_allow_http": True,
                "callback_allow_networks": ["127.0.0.0/8"],
                "callback_allow_ports": [port],
                "callback_timeout_s": 2,
                **(webhooks or {}),
            },
        ),
    ]
    if state is not None:
        tables.append(toml_table("state", state))
    return "\n".join(tables)


def _port_of(url: str | None) -> int:
    try:
        return urlsplit(url or "").port or 443
    except ValueError:
        return 443


def webhooks_config(
    manager_url: str,
    outbox_path: Path,
    callback_url: str | None,
    redis_url: str | None = None,
    **sections: Mapping[str, TomlValue],
) -> Config:
    """The configuration; with ``redis_url``, the state and the outbox in that Redis."""
    if redis_url is not None:
        sections = {**sections, "state": {"backend": "redis"}}
    environ = {**ENVIRON, "REDIS_URL": redis_url} if redis_url else ENVIRON
    return parse_config(
        webhooks_toml(manager_url, outbox_path, callback_url, **sections), environ=environ
    )


def sign(body: bytes, secret: str = MAIN_SECRET) -> str:
    """Manager's ``X-PharmaOne-Signature`` of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def manager_event(
    event_type: str = "order_request_status_updated",
    *,
    org_id: str = DEMO_ORG_ID,
    metadata: object = None,
    created_at: object = "2026-12-02T10:00:01Z",
    **extra: object,
) -> dict[str, Any]:
    """A Manager event body; its title and description name the customer, as Manager's may."""
    event: dict[str, Any] = {
        "id": "evt-1",
        "org_id": org_id,
        "event_type": event_type,
        "title": "Order request approved for Erika Musterfrau",
        "description": "Erika Musterfrau, Hauptstrasse 1: approved",
        "created_at": created_at,
    }
    if metadata is not None:
        event["metadata"] = metadata
    event.update(extra)
    return event


@dataclass
class Receiver:
    """A partner's callback endpoint: answers ``statuses`` in turn (then 204), records each."""

    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    redirect_to: str | None = None
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        self.arrived.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        status = self.statuses.pop(0) if self.statuses else 204
        return web.Response(status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/callbacks", self.handle)
        app.router.add_post("/elsewhere", self.handle)
        return app


def verify(secret: str, headers: Mapping[str, str], body: bytes) -> Any:
    """What a partner does: the standardwebhooks library's verifier (real time, 5 minutes)."""
    from standardwebhooks import Webhook

    return Webhook(secret).verify(body, dict(headers))
