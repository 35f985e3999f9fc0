"""``gateway new-secret`` and ``gateway outbox list|retry|drop`` against a real outbox file."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from conftest import ENVIRON, gateway_toml
from cryptography.fernet import Fernet
from pydantic import SecretStr

from gateway.cli import format_age, main
from gateway.outbox import NewOrder, OrderStatus, Remember, Settlement
from gateway.outbox.sealing import Sealer, new_key
from gateway.outbox.sqlite import SqliteOutbox

KEY = new_key()


def write_outbox_config(tmp_path: Path, *, enabled: bool = True) -> Path:
    text = gateway_toml("http://127.0.0.1:9")
    text += (
        f"\n[outbox]\nenabled = {'true' if enabled else 'false'}\n"
        f'path = "{tmp_path / "outbox.db"}"\nkey_env = "TEST_OUTBOX_KEY"\n'
    )
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def outbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    for name, value in {**ENVIRON, "TEST_OUTBOX_KEY": KEY}.items():
        monkeypatch.setenv(name, value)


async def fill_outbox(path: Path) -> None:
    """Three orders of partner acme: Q-1 queued, F-1 failed, D-1 delivered."""
    store = SqliteOutbox(path, Sealer([SecretStr(KEY)]))
    await store.open()
    now = time.time()
    for number, reference in enumerate(("Q-1", "F-1", "D-1")):
        order = NewOrder("acme", reference, "demo-org", b"sealed", now - 60, now, now + 3600)
        await store.put(order, Remember(f"k{number}", "fp", None, 0))
    await store.settle(
        "acme", "F-1", Settlement(OrderStatus.FAILED, now, last_error="upstream_timeout")
    )
    await store.settle(
        "acme", "D-1", Settlement(OrderStatus.DELIVERED, now, order_request_id="m-1")
    )
    await store.close()


def test_new_secret_outbox_prints_a_key_fernet_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-secret", "outbox"]) == 0
    key = capsys.readouterr().out.strip()
    Fernet(key)  # raises if it is not a Fernet key
    assert main(["new-secret", "outbox"]) == 0
    assert capsys.readouterr().out.strip() != key


def test_new_secret_webhook_prints_a_standard_webhooks_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["new-secret", "webhook"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32


async def test_outbox_list_shows_the_ledger_and_filters_by_status(
    tmp_path: Path, outbox_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_outbox_config(tmp_path)
    await fill_outbox(tmp_path / "outbox.db")
    assert await _main(["outbox", "list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "REFERENCE",
        "PARTNER",
        "STATUS",
        "ATTEMPTS",
        "AGE",
        "LAST",
        "ERROR",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["F-1"][2:] == ["failed", "1", "1m", "upstream_timeout"]
    assert rows["Q-1"][2] == "queued" and rows["D-1"][2] == "delivered"

    assert (
        await _main(["outbox", "list", "--config", str(config), "--status", "failed", "--json"])
        == 0
    )
    documents = json.loads(capsys.readouterr().out)
    assert [(d["partner"], d["external_reference"], d["status"]) for d in documents] == [
        ("acme", "F-1", "failed")
    ]
    assert documents[0]["last_error"] == "upstream_timeout"


async def test_outbox_retry_requeues_only_a_failed_order(
    tmp_path: Path, outbox_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_outbox_config(tmp_path)
    await fill_outbox(tmp_path / "outbox.db")
    base = ["outbox", "retry", "--config", str(config), "--partner", "acme"]
    assert await _main([*base, "F-1"]) == 0
    assert "queued again" in capsys.readouterr().out
    assert await _main([*base, "D-1"]) == 1  # delivered: nothing to retry
    assert await _main([*base, "F-1"]) == 1  # queued by now
    assert (
        await _main(["outbox", "retry", "--config", str(config), "--partner", "other", "Q-1"]) == 1
    )
    store = SqliteOutbox(tmp_path / "outbox.db", Sealer([SecretStr(KEY)]), owner=False)
    await store.open()
    entry = await store.get("acme", "F-1")
    await store.close()
    assert entry is not None and entry.status is OrderStatus.QUEUED


async def test_outbox_drop_discards_queued_or_failed_but_not_delivered(
    tmp_path: Path, outbox_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_outbox_config(tmp_path)
    await fill_outbox(tmp_path / "outbox.db")
    base = ["outbox", "drop", "--config", str(config), "--partner", "acme"]
    assert await _main([*base, "Q-1"]) == 0
    assert await _main([*base, "F-1"]) == 0
    assert await _main([*base, "D-1"]) == 1
    capsys.readouterr()
    assert (
        await _main(["outbox", "list", "--config", str(config), "--status", "dropped", "--json"])
        == 0
    )
    dropped = {d["external_reference"] for d in json.loads(capsys.readouterr().out)}
    assert dropped == {"Q-1", "F-1"}


async def test_outbox_commands_need_an_enabled_outbox_and_an_existing_file(
    tmp_path: Path, outbox_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    disabled = write_outbox_config(tmp_path, enabled=False)
    assert await _main(["outbox", "list", "--config", str(disabled)]) == 2
    assert "not enabled" in capsys.readouterr().err
    enabled = write_outbox_config(tmp_path)
    assert await _main(["outbox", "list", "--config", str(enabled)]) == 1
    assert "there is no outbox at" in capsys.readouterr().err
    assert not (tmp_path / "outbox.db").exists()  # the CLI never creates one


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59, "59s"), (60, "1m"), (7200, "2h"), (3 * 86400, "3d")]
)
def test_ages_are_shown_roughly(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown


async def _main(argv: list[str]) -> int:
    """``main`` runs its own event loop: keep it off the test's."""
    import asyncio

    return await asyncio.to_thread(main, argv)
