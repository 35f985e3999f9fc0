"""The SQLite outbox across real processes: ``kill -9``, restarts, unusable files, refused keys.

``python -m gateway sandbox`` is Manager and ``python -m gateway serve`` the gateway, each a
process of its own on free 127.0.0.1 ports, the outbox a file in the test's directory and its key
a fresh Fernet key in the environment. Every process is stopped by its PID when the test ends.
Nothing waits a fixed time: each step polls, with a deadline, for what it needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from conftest import KEYS, REPO_ROOT, flat_order, free_port, gateway_toml, toml_table
from test_workers import START_S, child_env, terminate, wait_for, write_config

from gateway.cli import main
from gateway.outbox.sealing import new_key

RETRY: Final = {"retry_min_s": 0.2, "retry_max_s": 1.0}
DELIVERED_S: Final = 10.0  # backoff of at most 1 s: every queued order is sent within a few


@dataclass
class Sandbox:
    """``python -m gateway sandbox``: Manager, with its outage switch and its record."""

    process: asyncio.subprocess.Process
    url: str
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: object = None) -> Any:
        async with self.session.request(method, self.url + path, json=body) as response:
            return await response.json() if response.status == 200 else response.status

    async def outage(self, **fault: object) -> None:
        assert await self.call("POST", "/_sandbox/outage", {"status": 503, **fault}) == 201

    async def end_outage(self) -> None:
        assert await self.call("DELETE", "/_sandbox/outage") == 204

    async def received(self) -> list[str]:
        """The references Manager accepted, one entry per accepted copy."""
        listing = await self.call("GET", "/_sandbox/order-requests")
        return [r["envelope"]["external_reference"] for r in listing["order_requests"]]

    async def attempts(self) -> int:
        listing = await self.call("GET", "/_sandbox/order-requests")
        return int(listing["order_request_attempts"])


@dataclass
class Gateway:
    """``python -m gateway serve`` with the outbox on."""

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path
    session: aiohttp.ClientSession

    @property
    def order_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/external-order"

    async def post(self, body: object, *, key: str = KEYS["acme"]) -> Answer:
        async with self.session.post(self.order_url, json=body, headers={"apikey": key}) as r:
            return Answer(r.status, await r.json(), dict(r.headers))

    async def order_status(self, reference: str) -> Answer:
        url = f"{self.order_url}/{reference}"
        async with self.session.get(url, headers={"apikey": KEYS["acme"]}) as r:
            return Answer(r.status, await r.json(), dict(r.headers))

    async def readyz(self) -> tuple[int, object] | None:
        try:
            url = f"http://127.0.0.1:{self.admin_port}/readyz"
            async with self.session.get(url) as response:
                return response.status, (await response.json()).get("status")
        except aiohttp.ClientError:
            return None

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return [entry for entry in entries if entry.get("event") == name]


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"


@dataclass
class Processes:
    """Everything a test starts, killed by PID at its end if it is still running."""

    session: aiohttp.ClientSession
    tmp_path: Path
    started: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def spawn(self, name: str, *args: str, env: Mapping[str, str]) -> tuple[Any, Path]:
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", *args,
                cwd=REPO_ROOT, env=dict(env), stdout=out, stderr=out,
            )  # fmt: skip
        self.started.append(process)
        return process, log

    async def sandbox(self) -> Sandbox:
        port = free_port()
        process, log = await self.spawn(
            "sandbox", "sandbox", "--host", "127.0.0.1", "--port", str(port), env=child_env(None)
        )
        sandbox = Sandbox(process, f"http://127.0.0.1:{port}", self.session)

        async def answering() -> bool:
            assert process.returncode is None, log.read_text()
            try:
                return isinstance(await sandbox.call("GET", "/_sandbox/order-requests"), dict)
            except aiohttp.ClientError:
                return False

        await wait_for(answering, "the sandbox", START_S)
        return sandbox

    async def gateway(
        self,
        name: str,
        outbox: Path,
        keys: str,
        *,
        manager_url: str = "http://127.0.0.1:9",
        ready: str = "ready",
    ) -> Gateway:
        """A gateway on ``outbox`` with ``keys`` (comma-separated), once /readyz says ``ready``
        (or, for a file it cannot use, ``state_unavailable``)."""
        port, admin_port = free_port(), free_port()
        outbox_table = {"enabled": True, "path": str(outbox), "key_env": "TEST_OUTBOX_KEY"}
        config = write_config(
            self.tmp_path / f"{name}.toml", manager_url, port=port, admin_port=admin_port,
            backend="memory", extra=toml_table("outbox", {**outbox_table, **RETRY}),
        )  # fmt: skip
        env = {**child_env(None), "TEST_OUTBOX_KEY": keys}
        process, log = await self.spawn(name, "serve", "--config", str(config), env=env)
        gateway = Gateway(process, port, admin_port, log, self.session)

        async def answering() -> bool:
            assert process.returncode is None, log.read_text()
            return (await gateway.readyz() or (0, None))[1] == ready

        await wait_for(answering, f"/readyz {ready!r} from {name}", START_S)
        return gateway


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    async with aiohttp.ClientSession() as session:
        started = Processes(session, tmp_path)
        try:
            yield started
        finally:
            for process in started.started:
                if process.returncode is None:
                    process.kill()
                await process.wait()


async def stop(gateway: Gateway) -> None:
    """SIGTERM: the gateway drains and closes its outbox (exit 0)."""
    assert await terminate(gateway.process) == 0, gateway.log.read_text()


async def poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    await wait_for(check, what, DELIVERED_S)


def order(reference: str) -> dict[str, object]:
    return flat_order(external_reference=reference)


def assert_queued(answer: Answer, reference: str) -> None:
    assert answer.status == 202, answer
    assert set(answer.body) == {"status", "external_reference", "message", "request_id"}
    assert answer.body["status"] == "queued"
    assert answer.body["external_reference"] == reference
    assert answer.headers["Location"] == f"/api/v1/external-order/{reference}"


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file of a directory and the SHA-256 of its bytes, except an -shm: the index of a
    WAL, which SQLite rebuilds from the WAL when it reads the file."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if not path.name.endswith("-shm")
    }


# --- kill -9 ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_kill_9_with_queued_and_in_flight_orders_then_restart_delivers_each_once(
    tmp_path: Path, processes: Processes
) -> None:
    outbox, key = tmp_path / "outbox.db", new_key()
    sandbox = await processes.sandbox()
    first = await processes.gateway("first", outbox, key, manager_url=sandbox.url)
    # Taken at once (and the gateway holds a token from now on: Manager's outage then meets
    # its order requests, which the sandbox counts).
    assert (await first.post(order("UP-0"))).status == 200
    await sandbox.outage()
    queued = [f"Q-{i}" for i in range(4)]
    for ref in queued:
        assert_queued(await first.post(order(ref)), ref)
    assert await first.readyz() == (200, "ready")  # Manager down: the gateway still takes orders
    ledger = await first.order_status("Q-0")
    assert ledger.body["status"] == "queued" and ledger.body["last_error"] == "upstream_unavailable"

    # Manager now holds every request for longer than the test runs, then refuses it without
    # keeping it: the order posted now (and the queued ones the deliverer retries) are in flight
    # at the kill, and Manager never has a copy of them. That makes the count deterministic:
    # each order arrives exactly once, from the restarted gateway.
    await sandbox.outage(delay_s=30)
    before = await sandbox.attempts()
    in_flight = asyncio.create_task(first.post(order("F-1")))

    async def stored_and_sent() -> bool:
        stored = (await first.order_status("F-1")).status == 200
        return stored and await sandbox.attempts() > before

    await poll(stored_and_sent, "F-1 stored and Manager called")
    os.kill(first.process.pid, signal.SIGKILL)
    assert await first.process.wait() == -signal.SIGKILL
    with pytest.raises(aiohttp.ClientError):
        await in_flight  # the partner never got an answer for F-1
    await sandbox.end_outage()
    assert await sandbox.received() == ["UP-0"]  # Manager kept no copy of the others

    second = await processes.gateway("second", outbox, key, manager_url=sandbox.url)
    everything = sorted([*queued, "F-1"])
    arrived = sorted([*everything, "UP-0"])

    async def all_delivered() -> bool:
        statuses = [(await second.order_status(ref)).body["status"] for ref in everything]
        return statuses == ["delivered"] * len(everything)

    await poll(all_delivered, "every order delivered after the restart")
    retried = await second.post(order("Q-1"))  # a partner's retry after the restart
    retried_in_flight = await second.post(order("F-1"))

    # Exactly once each: Manager refused (and kept nothing of) every request before the kill,
    # and a delivered order is settled, so no deliverer sends it again.
    assert sorted(await sandbox.received()) == arrived
    assert retried.status == 202 and retried.replayed  # idempotency survived kill -9
    assert retried_in_flight.status == 202 and retried_in_flight.replayed
    for ref in everything:
        ledger = await second.order_status(ref)
        assert ledger.body["order_request_id"] and ledger.body["manager_status"] == "pending"
    assert sorted(await sandbox.received()) == arrived
    await stop(second)


# --- files the gateway cannot use ---------------------------------------------------------------


def write_random_bytes(path: Path) -> str:
    path.write_bytes(random.Random(9).randbytes(64 * 1024))
    return "corrupted or not an SQLite database"


def write_foreign_database(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
        connection.executemany("INSERT INTO notes (text) VALUES (?)", [("a",), ("b",)])
    connection.close()
    return "not a telemed-gateway outbox"


async def assert_refuses_orders_and_keeps_the_file(
    gateway: Gateway, reason: str, key: str, directory: Path, before: dict[str, str]
) -> None:
    """The one log line, 503 for new orders and status reads, the file untouched."""
    refused = await gateway.post(order("NEW-1"))
    assert refused.status == 503, refused
    assert refused.body["error"] == "state_unavailable"
    assert (await gateway.order_status("Q-0")).body["error"] == "state_unavailable"
    assert await gateway.readyz() == (503, "state_unavailable")
    metrics = f"http://127.0.0.1:{gateway.admin_port}/metrics"
    async with gateway.session.get(metrics) as response:
        assert response.status == 200  # the operator still sees the gateway's metrics
    (line,) = gateway.events("outbox_unavailable")
    assert line["level"] == "critical"
    assert reason in line["reason"], line
    assert key not in gateway.log.read_text()
    assert fingerprint(directory) == before
    await stop(gateway)
    assert fingerprint(directory) == before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", [write_random_bytes, write_foreign_database])
async def test_corrupted_or_foreign_file_is_refused_clearly_and_left_untouched(
    damage: Callable[[Path], str], tmp_path: Path, processes: Processes
) -> None:
    directory = tmp_path / "outbox"
    directory.mkdir()
    outbox, key = directory / "outbox.db", new_key()
    reason = damage(outbox)
    before = fingerprint(directory)

    gateway = await processes.gateway("gateway", outbox, key, ready="state_unavailable")

    await assert_refuses_orders_and_keeps_the_file(gateway, reason, key, directory, before)


@pytest.mark.timeout(60)
async def test_wrong_key_is_refused_and_rotation_done_right_delivers_the_old_keys_orders(
    tmp_path: Path, processes: Processes
) -> None:
    directory = tmp_path / "outbox"
    directory.mkdir()
    outbox, old, new = directory / "outbox.db", new_key(), new_key()
    sandbox = await processes.sandbox()
    first = await processes.gateway("key-a", outbox, old, manager_url=sandbox.url)
    await sandbox.outage()
    for ref in ("Q-0", "Q-1"):
        assert_queued(await first.post(order(ref)), ref)
    os.kill(first.process.pid, signal.SIGKILL)  # the orders are left in the WAL
    await first.process.wait()
    await sandbox.end_outage()
    before = fingerprint(directory)
    assert set(before) == {"outbox.db", "outbox.db-wal"}

    # Rotation done wrong: the new key only. Nothing is sent, nothing is changed.
    wrong = await processes.gateway(
        "key-b", outbox, new, manager_url=sandbox.url, ready="state_unavailable"
    )
    await assert_refuses_orders_and_keeps_the_file(wrong, "another key", new, directory, before)
    assert await sandbox.received() == []

    # Done right: the new key first (it seals), the old one after it (it still opens).
    rotated = await processes.gateway("key-b-a", outbox, f"{new},{old}", manager_url=sandbox.url)

    async def delivered() -> bool:
        return sorted(await sandbox.received()) == ["Q-0", "Q-1"]

    await poll(delivered, "the old key's orders delivered")
    assert (await rotated.post(order("N-1"))).status == 200
    replay = await rotated.post(order("Q-0"))
    assert replay.status == 202 and replay.replayed
    await stop(rotated)
    assert sorted(await sandbox.received()) == ["N-1", "Q-0", "Q-1"]

    # No order sealed with the old key is left: the operator removes it, as the README says.
    retired = await processes.gateway("key-b-only", outbox, new, manager_url=sandbox.url)
    assert (await retired.post(order("N-2"))).status == 200
    assert (await retired.order_status("Q-0")).body["status"] == "delivered"
    await stop(retired)


# --- keys the CLI refuses -----------------------------------------------------------------------

GOOD_KEY: Final = new_key()


@dataclass(frozen=True)
class KeyCase:
    table: dict[str, object]
    environ: dict[str, str]
    names: tuple[str, ...]  # what the one line must name


KEY_CASES: Final = {
    "no key": KeyCase({}, {}, ("outbox.key_env",)),
    "empty variable": KeyCase(
        {"key_env": "TEST_OUTBOX_KEY"}, {"TEST_OUTBOX_KEY": " "}, ("outbox.key_env",)
    ),
    "not a fernet key": KeyCase(
        {"key_env": "TEST_OUTBOX_KEY"}, {"TEST_OUTBOX_KEY": "not-a-fernet-key"}, ("outbox.key_env",)
    ),
    "second key bad": KeyCase(
        {"key_env": "TEST_OUTBOX_KEY"},
        {"TEST_OUTBOX_KEY": f"{GOOD_KEY},{GOOD_KEY[:-4]}"},
        ("outbox.key_env", "key 2"),
    ),
    "not a fernet key in a file": KeyCase({"key_file": "KEY_FILE"}, {}, ("outbox.key_file",)),
    "both": KeyCase(
        {"key_env": "TEST_OUTBOX_KEY", "key_file": "KEY_FILE"},
        {"TEST_OUTBOX_KEY": GOOD_KEY},
        ("outbox", "key_env", "key_file"),
    ),
}


def write_key_case(tmp_path: Path, case: KeyCase) -> tuple[Path, dict[str, str]]:
    key_file = tmp_path / "outbox.key"
    key_file.write_text("not-a-fernet-key\n", encoding="utf-8")
    table = {k: str(key_file) if v == "KEY_FILE" else v for k, v in case.table.items()}
    outbox = {"enabled": True, "path": str(tmp_path / "outbox.db"), **table}
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_toml("http://127.0.0.1:9", extra={"outbox": outbox}), "utf-8")
    return config, {**child_env(None), **case.environ}


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", KEY_CASES.values(), ids=KEY_CASES.keys())
def test_check_config_and_serve_refuse_an_outbox_without_a_valid_key(
    command: str,
    case: KeyCase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, environ = write_key_case(tmp_path, case)
    monkeypatch.delenv("TEST_OUTBOX_KEY", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)

    code = main([command, "--config", str(config)])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    (line,) = err.splitlines()
    for name in case.names:
        assert name in line, line
    assert "not-a-fernet-key" not in line and GOOD_KEY not in line  # no key is ever echoed
    assert not (tmp_path / "outbox.db").exists()


def test_serve_process_refuses_an_outbox_without_a_key_with_exit_2(tmp_path: Path) -> None:
    config, environ = write_key_case(tmp_path, KEY_CASES["no key"])

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert "outbox.key_env" in line
