"""The SQLite outbox through the whole gateway (contract sections 9 and 10), in one process.

Real HTTP on loopback: the sandbox as Manager (its outage switch and faults), the gateway as an
aiohttp test server over a real outbox file. Time is the fake clock; the deliverer's loop is off
(``deliverer_poll_s=None``) and each test calls ``run_once`` where the loop would have woken.
The same promises across real processes and ``kill -9``: ``test_outbox_processes.py``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import (
    KEYS,
    ORDER_PATH,
    Client,
    FakeTime,
    GatewayHarness,
    MakeGateway,
    Reply,
    assert_error,
    base_url_of,
    flat_order,
    post_order,
    read_reply,
)
from pydantic import SecretStr
from pytest_aiohttp import AiohttpServer

from gateway.auth import hash_key
from gateway.errors import StateUnavailableError
from gateway.outbox import NewOrder, Remember
from gateway.outbox.sealing import Sealer, new_key
from gateway.outbox.sqlite import SqliteOutbox
from gateway.sandbox import DEMO_ORG_ID, SandboxState

OUTBOX_KEY: Final = new_key()
RETRY_MIN_S: Final = 5.0
RETRY_MAX_S: Final = 60.0
LATER_S: Final = 3600.0  # past any retry delay and claim lease, well before max_age_hours
QUEUED_KEYS: Final = {"status", "external_reference", "message", "request_id"}


def outbox_table(path: Path) -> dict[str, Any]:
    return {
        "enabled": True,
        "path": str(path),
        "key_env": "TEST_OUTBOX_KEY",
        "retry_min_s": RETRY_MIN_S,
        "retry_max_s": RETRY_MAX_S,
        "max_age_hours": 24,
    }


StartOutboxGateway = Callable[..., Awaitable[GatewayHarness]]


@pytest.fixture
def outbox_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
def start_outbox_gateway(make_gateway: MakeGateway, outbox_path: Path) -> StartOutboxGateway:
    """A gateway with the outbox on (admin endpoints on the same port), its deliverer driven
    by the test; ``max_pages`` limits the file as a full disk would."""

    async def start(
        *,
        path: Path | None = None,
        max_pages: int | None = None,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> GatewayHarness:
        return await make_gateway(
            server={"admin_port": 0},
            extra={"outbox": outbox_table(path or outbox_path), **(extra or {})},
            environ={"TEST_OUTBOX_KEY": OUTBOX_KEY},
            seams={"deliverer_poll_s": None, "outbox_max_pages": max_pages},
        )

    return start


async def deliver_due(harness: GatewayHarness) -> int:
    """One round of the deliverer, as its loop would run it."""
    gateway = harness.gateway
    assert gateway.outbox is not None
    return await gateway.outbox.run_once(gateway.runtime.targets, gateway.manager)


async def order_status(client: Client, reference: str, *, key: str = KEYS["acme"]) -> Reply:
    async with client.get(f"{ORDER_PATH}/{reference}", headers={"apikey": key}) as response:
        return await read_reply(response)


async def call_sandbox(sandbox: TestServer, method: str, path: str, body: object = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base_url_of(sandbox) + path, json=body) as response,
    ):
        return response.status


async def start_outage(sandbox: TestServer, fault: Mapping[str, object] | None = None) -> None:
    """Manager answers every call with ``fault`` (default 503) until :func:`end_outage`."""
    body = fault or {"status": 503}
    assert await call_sandbox(sandbox, "POST", "/_sandbox/outage", body) == 201


async def end_outage(sandbox: TestServer) -> None:
    assert await call_sandbox(sandbox, "DELETE", "/_sandbox/outage") == 204


def received(state: SandboxState) -> dict[str, list[Any]]:
    """What Manager accepted, by reference: one (request, envelope) pair per accepted copy."""
    found: dict[str, list[Any]] = {}
    for request in state.received:
        envelope: Any = request["envelope"]
        found.setdefault(envelope["external_reference"], []).append((request, envelope))
    return found


def arrived(state: SandboxState) -> list[str]:
    """The references Manager accepted (one entry per accepted copy)."""
    return [ref for ref, copies in received(state).items() for _ in copies]


def manager_id_of(state: SandboxState, reference: str) -> object:
    ((request, _),) = received(state)[reference]
    return request["id"]


def stored_body(path: Path, reference: str) -> bytes | None:
    """The sealed body of an order as the file holds it (read-only, beside the gateway)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        row = connection.execute(
            "SELECT body FROM orders WHERE reference = ?", (reference,)
        ).fetchone()
    assert row is not None, f"{reference} is not in the outbox"
    return None if row[0] is None else bytes(row[0])


def assert_queued(reply: Reply, reference: str, *, replayed: bool = False) -> None:
    """The contract's ``202 queued`` (section 2) with the status URL in ``Location``."""
    assert reply.status == 202, reply.body
    assert set(reply.body) == QUEUED_KEYS
    assert reply.body["status"] == "queued"
    assert reply.body["external_reference"] == reference
    assert isinstance(reply.body["message"], str) and reply.body["message"]
    assert reply.headers["Location"] == f"{ORDER_PATH}/{reference}"
    assert reply.headers.get("Idempotent-Replayed") == ("true" if replayed else None)
    if not replayed:
        assert reply.body["request_id"] == reply.headers["X-Request-ID"]


# --- Manager down, then up ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "outage",
    [{"status": 503}, {"drop": True}, {"status": 429, "retry_after": "1"}],
    ids=["503", "connection-dropped", "429"],
)
async def test_orders_queued_while_manager_is_down_arrive_once_each_when_it_is_back(
    outage: Mapping[str, object],
    start_outbox_gateway: StartOutboxGateway,
    sandbox: TestServer,
    sandbox_state: SandboxState,
    fake_time: FakeTime,
) -> None:
    harness = await start_outbox_gateway()
    client = harness.client
    await start_outage(sandbox, outage)
    references = [f"Q-{i}" for i in range(4)]

    first = {
        ref: await post_order(client, flat_order(external_reference=ref)) for ref in references
    }
    replay = await post_order(client, flat_order(external_reference="Q-0"))

    for ref, reply in first.items():
        assert_queued(reply, ref)
    assert_queued(replay, "Q-0", replayed=True)
    assert replay.body == first["Q-0"].body  # the first answer, request id included
    status = await order_status(client, "Q-0")
    assert status.status == 200
    assert status.body["status"] == "queued"
    # attempts counts requests to order-requests: with no token yet and the token endpoint down
    # too, none was sent.
    assert status.body["attempts"] == 0
    assert status.body["last_error"] == "upstream_unavailable"
    assert status.body["order_request_id"] is None
    assert (await client.get("/readyz")).status == 200  # Manager's outage is not the gateway's
    assert sandbox_state.received == []

    fake_time.now += LATER_S
    assert await deliver_due(harness) == len(references)  # still down: tried again, kept
    assert (await order_status(client, "Q-1")).body["attempts"] == 0
    await end_outage(sandbox)
    fake_time.now += LATER_S
    assert await deliver_due(harness) == len(references)
    fake_time.now += LATER_S
    assert await deliver_due(harness) == 0  # nothing is left to send
    replay_after = await post_order(client, flat_order(external_reference="Q-0"))

    assert sorted(arrived(sandbox_state)) == references  # each exactly once
    for ref in references:
        body = (await order_status(client, ref)).body
        assert body["status"] == "delivered", body
        assert body["order_request_id"] == manager_id_of(sandbox_state, ref)
        assert body["manager_status"] == "pending"
        assert body["attempts"] == 1  # the one request that Manager took
        assert body["last_error"] is None
    assert_queued(replay_after, "Q-0", replayed=True)  # a 202 stays a 202; the status tells
    assert len(sandbox_state.received) == len(references)


async def test_order_manager_takes_at_once_answers_its_reply_and_is_delivered_after_one_attempt(
    start_outbox_gateway: StartOutboxGateway, sandbox_state: SandboxState, outbox_path: Path
) -> None:
    client = (await start_outbox_gateway()).client

    reply = await post_order(client, flat_order(external_reference="NOW-1"))
    replay = await post_order(client, flat_order(external_reference="NOW-1"))

    assert reply.status == 200
    assert reply.body["id"] == manager_id_of(sandbox_state, "NOW-1")
    assert reply.body["status"] == "pending"
    assert "Location" not in reply.headers
    assert replay.status == 200 and replay.body == reply.body
    assert replay.headers["Idempotent-Replayed"] == "true"
    status = await order_status(client, "NOW-1")
    assert status.body["status"] == "delivered"
    assert status.body["attempts"] == 1
    assert status.body["order_request_id"] == reply.body["id"]
    assert status.body["manager_status"] == "pending"
    assert stored_body(outbox_path, "NOW-1") is None  # delivered: the body is deleted
    assert arrived(sandbox_state) == ["NOW-1"]


async def test_another_partners_reference_is_not_found_like_an_unknown_one(
    start_outbox_gateway: StartOutboxGateway,
) -> None:
    client = (await start_outbox_gateway()).client
    assert (await post_order(client, flat_order(external_reference="MINE-1"))).status == 200

    others = await order_status(client, "MINE-1", key=KEYS["fwd"])
    unknown = await order_status(client, "NEVER-SENT")

    assert_error(others, 404, "not_found")
    assert_error(unknown, 404, "not_found")
    assert others.body["message"] == unknown.body["message"]


# --- Manager rejecting --------------------------------------------------------------------------

STRAY_KEY: Final = "stray-partner-key-0123456789"
# A shop Manager does not know under this org: the sandbox answers 400 validation_error.
STRAY_TABLES: Final = {
    "shops.stray": {
        "org_id": DEMO_ORG_ID,
        "shop_id": "a-shop-of-another-org",
        "manager_key_env": "TEST_ORG_KEY",
    },
    "partners.stray": {
        "shop": "stray",
        "key_sha256": hash_key(STRAY_KEY),
    },
}


@pytest.mark.parametrize("refusal", ["fault-422", "invalid-envelope-400"])
async def test_order_manager_rejects_is_rejected_its_body_deleted_and_never_sent_again(
    refusal: str,
    start_outbox_gateway: StartOutboxGateway,
    sandbox: TestServer,
    sandbox_state: SandboxState,
    fake_time: FakeTime,
    outbox_path: Path,
) -> None:
    harness = await start_outbox_gateway(extra=STRAY_TABLES)
    client = harness.client
    key, status = KEYS["acme"], 422
    if refusal == "fault-422":
        fault = {"status": 422, "body": {"error": "unprocessable"}, "endpoint": "order-requests"}
        assert await call_sandbox(sandbox, "POST", "/_sandbox/faults", fault) == 201
    else:
        key, status = STRAY_KEY, 400

    reply = await post_order(client, flat_order(external_reference="REJ-1"), key=key)

    body = assert_error(reply, status, "upstream_rejected")
    assert body["details"]
    ledger = (await order_status(client, "REJ-1", key=key)).body
    assert ledger["status"] == "rejected"
    assert ledger["attempts"] == 1
    assert ledger["last_error"] == "upstream_rejected"
    assert stored_body(outbox_path, "REJ-1") is None
    attempts = sandbox_state.order_request_attempts
    assert attempts == 1

    for _ in range(3):
        fake_time.now += LATER_S
        assert await deliver_due(harness) == 0
    assert sandbox_state.order_request_attempts == attempts  # never retried by the gateway

    again = await post_order(client, flat_order(external_reference="REJ-1"), key=key)

    # Forgotten: the partner may correct and send it again; it is not a replay.
    assert "Idempotent-Replayed" not in again.headers
    assert sandbox_state.order_request_attempts == attempts + 1
    if refusal == "fault-422":
        assert again.status == 200
        assert (await order_status(client, "REJ-1")).body["status"] == "delivered"
        assert arrived(sandbox_state) == ["REJ-1"]
    else:
        assert_error(again, 400, "upstream_rejected")
        assert arrived(sandbox_state) == []


# --- a full disk --------------------------------------------------------------------------------

# A field of the order's own (forwarded untouched): every such order needs new pages in the file.
BULK: Final = "bulk " * 4000


def bulky_order(reference: str) -> dict[str, object]:
    return flat_order(external_reference=reference, notes=BULK)


async def test_full_disk_refuses_new_orders_with_state_unavailable_and_keeps_stored_ones(
    start_outbox_gateway: StartOutboxGateway,
    sandbox: TestServer,
    sandbox_state: SandboxState,
    fake_time: FakeTime,
    log_stream: Any,
) -> None:
    first = await start_outbox_gateway()
    await start_outage(sandbox)
    kept = ["KEPT-0", "KEPT-1"]
    for ref in kept:
        assert_queued(await post_order(first.client, bulky_order(ref)), ref)
    await first.client.close()
    # SQLite will not shrink a file: a limit of one page is "no page more than it has now".
    full = await start_outbox_gateway(max_pages=1)
    await end_outage(sandbox)
    attempts = sandbox_state.order_request_attempts

    refused = await post_order(full.client, bulky_order("NEW-0"))

    assert_error(refused, 503, "state_unavailable")
    assert sandbox_state.order_request_attempts == attempts  # not stored: not forwarded either
    assert "database or disk is full" in log_stream.getvalue()
    for ref in kept:  # what is stored stays, and can be read
        assert (await order_status(full.client, ref)).body["status"] == "queued"
    await full.client.close()

    roomy = await start_outbox_gateway()  # space is back
    fake_time.now += LATER_S
    assert await deliver_due(roomy) == len(kept)
    again = await post_order(roomy.client, bulky_order("NEW-0"))  # the partner's retry

    assert again.status == 200 and "Idempotent-Replayed" not in again.headers
    assert sorted(arrived(sandbox_state)) == [*kept, "NEW-0"]
    for ref in kept:
        assert (await order_status(roomy.client, ref)).body["status"] == "delivered"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 256 KiB (tmpfs): needs root and a machine that allows mounts."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root and mount; the Seams test covers this")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = done.stderr.strip() or f"exit {done.returncode}"
        pytest.skip(f"this machine does not allow a tmpfs mount ({reason}); Seams test covers it")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def grow(mount_point: Path, size: str) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(mount_point)], capture_output=True, check=True
    )


async def test_real_full_filesystem_refuses_new_orders_and_loses_none_that_were_stored(
    tiny_disk: Path,
    start_outbox_gateway: StartOutboxGateway,
    sandbox: TestServer,
    sandbox_state: SandboxState,
    fake_time: FakeTime,
) -> None:
    harness = await start_outbox_gateway(path=tiny_disk / "outbox.db")
    client = harness.client
    await start_outage(sandbox)
    queued: list[str] = []
    for i in range(40):
        reply = await post_order(client, bulky_order(f"FILL-{i}"))
        if reply.status != 202:
            break
        queued.append(f"FILL-{i}")

    assert_error(reply, 503, "state_unavailable")  # the disk filled up: never a 202 then
    assert queued, "not one order fitted on the disk"
    refused = f"FILL-{len(queued)}"
    assert_error(await post_order(client, bulky_order("FILL-X")), 503, "state_unavailable")
    for ref in queued:
        assert (await order_status(client, ref)).body["status"] == "queued"

    grow(tiny_disk, "8m")
    await end_outage(sandbox)
    fake_time.now += LATER_S
    while await deliver_due(harness):
        pass
    again = await post_order(client, bulky_order(refused))

    assert again.status == 200
    assert sorted(arrived(sandbox_state)) == sorted([*queued, refused])
    for ref in queued:
        assert (await order_status(client, ref)).body["status"] == "delivered"


# --- nothing in clear text at rest --------------------------------------------------------------

INLINE_PDF: Final = (
    b"%PDF-1.4\n% " + b"inline prescription of Grete Probewitz; " * 40 + b"\n%%EOF\n"
)
FETCHED_PDF: Final = (
    b"%PDF-1.4\n% " + b"fetched prescription of Hannes Musterprobe; " * 40 + b"\n%%EOF\n"
)
INLINE_CUSTOMER: Final = {
    "customer_name": "Grete Probewitz",
    "customer_email": "grete.probewitz@example.test",
    "street": "Geheimgasse 17",
    "city": "Probstadt an der Weide",
}
URL_CUSTOMER: Final = {
    "customer_name": "Hannes Musterprobe",
    "customer_email": "hannes.musterprobe@example.test",
    "street": "Verborgener Weg 3",
    "city": "Stillwasser im Tal",
}
NEEDLES: Final = (
    *(value.encode() for value in (*INLINE_CUSTOMER.values(), *URL_CUSTOMER.values())),
    INLINE_PDF,
    FETCHED_PDF,
    base64.b64encode(INLINE_PDF),
    base64.b64encode(FETCHED_PDF),
    b"prescription of Grete",
    b"prescription of Hannes",
)


def found_in_outbox_files(path: Path) -> list[str]:
    """Which needles the outbox's files (the database, its -wal and -shm) hold as bytes."""
    found = []
    for file in sorted(path.parent.glob(path.name + "*")):
        data = file.read_bytes()
        found += [f"{file.name}: {needle[:30]!r}" for needle in NEEDLES if needle in data]
    return found


@pytest.fixture
async def pdf_host(aiohttp_server: AiohttpServer) -> AsyncIterator[TestServer]:
    async def serve_pdf(request: web.Request) -> web.Response:
        return web.Response(body=FETCHED_PDF, content_type="application/pdf")

    app = web.Application()
    app.router.add_get("/rx.pdf", serve_pdf)
    yield await aiohttp_server(app, host="127.0.0.1")


async def test_outbox_files_hold_no_customer_data_or_pdf_bytes_queued_or_delivered(
    start_outbox_gateway: StartOutboxGateway,
    sandbox: TestServer,
    sandbox_state: SandboxState,
    pdf_host: TestServer,
    fake_time: FakeTime,
    outbox_path: Path,
) -> None:
    pdf = {"allow_http": True, "allow_ports": [pdf_host.port], "allow_networks": ["127.0.0.0/8"]}
    harness = await start_outbox_gateway(extra={"pdf": pdf})
    client = harness.client
    await start_outage(sandbox)
    inline = {
        "external_reference": "RX-INLINE",
        **INLINE_CUSTOMER,
        "prescription_pdf_base64": base64.b64encode(INLINE_PDF).decode(),
    }
    by_url = {
        "external_reference": "RX-URL",
        **URL_CUSTOMER,
        "prescription_url": f"http://127.0.0.1:{pdf_host.port}/rx.pdf",
    }

    assert_queued(await post_order(client, inline), "RX-INLINE")
    assert_queued(await post_order(client, by_url), "RX-URL")

    assert {p.name for p in outbox_path.parent.glob("outbox.db*")} >= {"outbox.db", "outbox.db-wal"}
    assert found_in_outbox_files(outbox_path) == []
    # The orders are in there, sealed: the key opens them, with the fetched PDF inside.
    sealer = Sealer([SecretStr(OUTBOX_KEY)])
    for ref, needle in (
        ("RX-INLINE", b"Grete Probewitz"),
        ("RX-URL", base64.b64encode(FETCHED_PDF)),
    ):
        sealed = stored_body(outbox_path, ref)
        assert sealed is not None and needle in sealer.open(sealed)

    await end_outage(sandbox)
    fake_time.now += LATER_S
    assert await deliver_due(harness) == 2

    assert sorted(arrived(sandbox_state)) == ["RX-INLINE", "RX-URL"]
    ((_, fetched),) = received(sandbox_state)["RX-URL"]
    assert fetched["payload"]["prescription_pdf_base64"] == base64.b64encode(FETCHED_PDF).decode()
    assert found_in_outbox_files(outbox_path) == []
    await client.close()  # checkpointed into the database file, -wal and -shm gone
    assert found_in_outbox_files(outbox_path) == []


# --- bugs found by these tests ------------------------------------------------------------------


async def test_full_disk_is_reported_as_full_not_as_a_missing_savepoint(
    tmp_path: Path, log_stream: Any
) -> None:
    # SQLite rolls a whole transaction back when the disk is full; the writer then tried to roll
    # back to the operation's savepoint and logged "no such savepoint: op" instead of the cause.
    sealer = Sealer([SecretStr(OUTBOX_KEY)])
    store = SqliteOutbox(tmp_path / "outbox.db", sealer, max_pages=1)
    await store.open()
    try:

        def new_order(reference: str, body: bytes) -> NewOrder:
            return NewOrder("acme", reference, DEMO_ORG_ID, sealer.seal(body), 0.0, 0.0, 60.0)

        small, big = await asyncio.gather(
            store.put(new_order("SMALL", b"{}"), Remember("k-small", "f", None, 0)),
            store.put(new_order("BIG", BULK.encode()), Remember("k-big", "f", None, 0)),
            return_exceptions=True,
        )

        assert isinstance(big, StateUnavailableError)
        assert "database or disk is full" in str(big.__cause__)
        log = log_stream.getvalue()
        assert "database or disk is full" in log and "savepoint" not in log
        # Each caller was told the truth: stored if and only if the file has it.
        stored = {entry.reference for entry in await store.list_entries()}
        assert stored == ({"SMALL"} if small is None else set())
    finally:
        await store.close()


async def test_old_key_can_be_removed_after_a_rotation_once_no_order_needs_it(
    tmp_path: Path,
) -> None:
    # The canary stayed sealed with the key that created the file: after a rotation done right
    # (new key first, old key after it), removing the old key made the whole outbox unusable.
    path, old, new = tmp_path / "outbox.db", SecretStr(new_key()), SecretStr(new_key())
    for keys in ([old], [new, old], [new]):
        store = SqliteOutbox(path, Sealer(keys))
        await store.open()
        problem = store.problem
        await store.close()
        assert problem is None, (keys, problem)
    wrong = SqliteOutbox(path, Sealer([old]))  # the retired key alone no longer opens it
    await wrong.open()
    assert wrong.problem is not None and "another key" in wrong.problem
    await wrong.close()


def wal_snapshot(directory: Path) -> dict[str, bytes]:
    """The database and its WAL as bytes (the -shm is an index SQLite rebuilds from the WAL)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix != ".db-shm"}


async def test_wrong_key_after_a_crash_leaves_the_database_and_its_wal_untouched(
    tmp_path: Path,
) -> None:
    # The keys were checked on a read-write connection: closing it, SQLite checkpointed the WAL
    # that the crash had left into the database file, which a refused open must not change.
    old, new = SecretStr(new_key()), SecretStr(new_key())
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    live.mkdir()
    crashed.mkdir()
    store = SqliteOutbox(live / "outbox.db", Sealer([old]))
    await store.open()
    for reference in ("C-0", "C-1"):
        order = NewOrder("acme", reference, DEMO_ORG_ID, b"sealed", 0.0, 0.0, 60.0)
        await store.put(order, Remember(reference, "f", None, 0))
    for file in live.iterdir():  # the files as kill -9 leaves them: the orders are in the WAL
        (crashed / file.name).write_bytes(file.read_bytes())
    await store.close()
    before = wal_snapshot(crashed)
    assert set(before) == {"outbox.db", "outbox.db-wal"}

    wrong = SqliteOutbox(crashed / "outbox.db", Sealer([new]))
    await wrong.open()
    await wrong.close()

    assert wrong.problem is not None and "another key" in wrong.problem
    assert wal_snapshot(crashed) == before
    rotated = SqliteOutbox(crashed / "outbox.db", Sealer([new, old]))
    await rotated.open()
    assert sorted(entry.reference for entry in await rotated.list_entries()) == ["C-0", "C-1"]
    await rotated.close()


async def test_location_of_a_reference_with_slash_space_and_umlaut_answers_its_status(
    start_outbox_gateway: StartOutboxGateway, sandbox: TestServer
) -> None:
    client = (await start_outbox_gateway()).client
    await start_outage(sandbox)
    reference = "TM/2026 #1 Müller?x=1"

    reply = await post_order(client, flat_order(external_reference=reference))

    assert reply.status == 202
    location = reply.headers["Location"]
    assert location.count("/") == 4  # the reference is one segment
    async with client.get(location, headers={"apikey": KEYS["acme"]}) as response:
        status = await read_reply(response)
    assert status.status == 200, status.body
    assert status.body["external_reference"] == reference
    assert status.body["status"] == "queued"
