"""The demo's partner receiver (scripts/partner_receiver.py) accepts what the gateway signs and
refuses anything else, as a partner's endpoint would."""

from __future__ import annotations

import importlib.util
import time
from types import ModuleType

import pytest
from conftest import REPO_ROOT
from pytest_aiohttp import AiohttpClient
from webhook_kit import ALPHA_WHSEC, GAMMA_WHSEC

from gateway.callbacks import build_body, build_headers
from gateway.config import parse_whsec
from gateway.outbox import CallbackMessage

MESSAGE = CallbackMessage(
    id="msg_demo", partner="telemed-one", type="order.updated", reference="LOOP-1",
    status="delivered", order_request_id="7b8e", manager_status="approved",
    event="order_request_status_updated", created_at=time.time(), expires_at=time.time() + 60,
)  # fmt: skip


def load_receiver() -> ModuleType:
    path = REPO_ROOT / "scripts" / "partner_receiver.py"
    spec = importlib.util.spec_from_file_location("partner_receiver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("signed_with", "status"), [(ALPHA_WHSEC, 204), (GAMMA_WHSEC, 400)])
async def test_receiver_verifies_callbacks(
    aiohttp_client: AiohttpClient,
    capsys: pytest.CaptureFixture[str],
    signed_with: str,
    status: int,
) -> None:
    client = await aiohttp_client(load_receiver().create_app(ALPHA_WHSEC))
    body = build_body(MESSAGE)
    headers = build_headers(parse_whsec(signed_with) or b"", MESSAGE.id, int(time.time()), body)
    async with client.post("/callbacks", data=body, headers=headers) as response:
        assert response.status == status
    out = capsys.readouterr().out
    if status == 204:
        assert "order.updated LOOP-1" in out and "manager_status=approved" in out
    else:
        assert "refused" in out
