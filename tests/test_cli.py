"""The ``gateway`` command: in-process with capsys, and ``serve`` as a real process on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ENVIRON, KEYS, REPO_ROOT, SAMPLES, TomlValue, gateway_toml

from gateway.auth import hash_key
from gateway.cli import main
from gateway.sandbox import DEMO_SHOP_ID

MANAGER_URL = "http://127.0.0.1:9"  # never contacted by these commands


def write_config(
    tmp_path: Path,
    *,
    base_url: str = MANAGER_URL,
    server: Mapping[str, TomlValue] | None = None,
    replace: tuple[str, str] | None = None,
) -> Path:
    text = gateway_toml(base_url, server=server, manager={"timeout_s": 5})
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace, 1)
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)


def child_env(*, without: str | None = None) -> dict[str, str]:
    env = {**os.environ, **ENVIRON}
    env.pop("GATEWAY_CONFIG", None)
    if without is not None:
        env.pop(without, None)
    return env


# --- keys ---------------------------------------------------------------------------------------


def test_new_key_prints_a_key_and_its_sha256(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-key"]) == 0

    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    key, digest = lines["key"].strip(), lines["key_sha256"].strip()
    assert len(key) >= 32
    assert digest == hash_key(key)


def test_new_key_differs_each_time(capsys: pytest.CaptureFixture[str]) -> None:
    main(["new-key"])
    first = capsys.readouterr().out
    main(["new-key"])
    assert capsys.readouterr().out != first


def test_hash_key_reads_the_key_on_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("  partner-key-123\n"))

    assert main(["hash-key"]) == 0

    assert capsys.readouterr().out.strip() == hash_key("partner-key-123")


def test_hash_key_without_a_key_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    assert main(["hash-key"]) == 2
    assert capsys.readouterr().out == ""


# --- check-config -------------------------------------------------------------------------------


def test_check_config_prints_a_summary_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    path = write_config(tmp_path)

    assert main(["check-config", "--config", str(path)]) == 0

    out, err = capsys.readouterr()
    assert out.startswith("configuration ok")
    assert "shop main: org demo-org, shop demo-shop, api v2" in out
    assert "shop legacy: org demo-org, shop demo-shop, api v1" in out
    assert "partner drx: shop main, pdf forward, profile drx" in out
    for secret in (*ENVIRON.values(), *KEYS.values(), hash_key(KEYS["acme"])):
        assert secret not in out + err


def test_check_config_finds_the_file_through_gateway_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    secrets_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(write_config(tmp_path)))

    assert main(["check-config"]) == 0
    assert capsys.readouterr().out.startswith("configuration ok")


BROKEN_CONFIGS = {
    "unknown-key": (('host = "127.0.0.1"', 'host = "127.0.0.1"\nbogus = 1'), "server.bogus"),
    "bad-hash": ((hash_key(KEYS["acme"]), "not-a-hash"), "partners.acme.key_sha256"),
    "missing-env": (("TEST_READER_ORG_KEY", "TEST_UNSET_ORG_KEY"), "TEST_UNSET_ORG_KEY"),
    "unknown-shop": (('shop = "legacy"', 'shop = "nowhere"'), "partners.legacy.shop"),
}


@pytest.mark.parametrize("case", BROKEN_CONFIGS)
def test_check_config_refuses_a_broken_file_with_exit_2_naming_the_key(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    replace, named = BROKEN_CONFIGS[case]
    path = write_config(tmp_path, replace=replace)

    assert main(["check-config", "--config", str(path)]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("gateway: configuration refused:")
    assert named in line
    for secret in ENVIRON.values():
        assert secret not in err


def test_check_config_as_a_command_exits_2_with_one_line(tmp_path: Path) -> None:
    replace, named = BROKEN_CONFIGS["unknown-key"]
    path = write_config(tmp_path, replace=replace)

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert named in line


# --- map ----------------------------------------------------------------------------------------


def run_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], partner: str, file: Path
) -> tuple[int, Any, str]:
    """``gateway map``: the exit code, stdout as JSON (None if empty), stderr."""
    code = main(["map", "--config", str(write_config(tmp_path)), "--partner", partner, str(file)])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else None, err


def test_map_prints_the_envelope_of_a_flat_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    code, envelope, _ = run_map(tmp_path, capsys, "acme", SAMPLES / "flat-payload.json")

    assert code == 0
    assert envelope["external_reference"] == "TM-10001"
    assert envelope["source"] == "telemed-one"
    assert envelope["payload"]["shop_id"] == DEMO_SHOP_ID
    assert envelope["payload"]["address_street"] == "Musterstr. 1"


def test_map_normalizes_qty_and_numeric_strings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    code, envelope, _ = run_map(tmp_path, capsys, "acme", SAMPLES / "qty-style.json")

    assert code == 0
    assert envelope["source"] == "acme"
    assert envelope["payload"]["items"] == [{"name": "Flos 18/1", "quantity": 3, "price": 8.59}]
    assert envelope["payload"]["total_amount"] == 25.77


def test_map_applies_the_partners_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    code, envelope, _ = run_map(tmp_path, capsys, "drx", SAMPLES / "nested-partner.json")

    assert code == 0
    assert envelope["external_reference"] == "DRX-2026-000815"
    payload = envelope["payload"]
    assert payload["customer_name"] == "Max Mustermann"
    assert payload["prescription_pdf_url"] == "https://drx.example/rx/815.pdf"
    assert payload["items"][0] == {
        "name": "Flos 22/1",
        "quantity": 5,
        "p1_id": "12345",
        "price": 8.59,
    }
    assert "patient" not in payload and "created" not in payload


def test_map_prints_validation_details_and_exits_1_for_an_invalid_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"customer_email": "x", "items": [{"name": "A", "qty": 0}]}))

    code, problem, _ = run_map(tmp_path, capsys, "acme", invalid)

    assert code == 1
    assert problem["error"] == "validation_failed"
    fields = {detail["field"] for detail in problem["details"]}
    assert {"payload.customer_email", "payload.items[0].quantity"} <= fields


def test_map_of_a_file_that_is_not_json_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")

    code, problem, _ = run_map(tmp_path, capsys, "acme", broken)

    assert code == 1
    assert problem["error"] == "invalid_json"


def test_map_for_an_unknown_partner_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    code, out, err = run_map(tmp_path, capsys, "nobody", SAMPLES / "flat-payload.json")

    assert code == 2
    assert out is None
    assert "partners.nobody" in err


def test_map_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    code, out, err = run_map(tmp_path, capsys, "acme", tmp_path / "missing.json")

    assert code == 2
    assert out is None
    assert "missing.json" in err


# --- serve --------------------------------------------------------------------------------------


def test_serve_with_several_workers_and_memory_state_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    path = write_config(tmp_path)

    assert main(["serve", "--config", str(path), "--workers", "2"]) == 2
    assert "redis" in capsys.readouterr().err


def test_serve_with_a_missing_environment_variable_exits_2_naming_it(tmp_path: Path) -> None:
    path = write_config(tmp_path)

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        cwd=REPO_ROOT,
        env=child_env(without="TEST_ORG_KEY"),
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "TEST_ORG_KEY" in line
    assert done.stdout == ""


def test_serve_on_a_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, server={"host": "127.0.0.1", "port": port})

        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=20,
        )  # fmt: skip

    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1" in done.stderr
    assert "Traceback" not in done.stderr


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, within_s: float = 10.0) -> None:
    """Poll ``check`` until it is true (bounded), for a process started by the test."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)  # polling another process: no event to wait on
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def status_of(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as response:
            return response.status
    except aiohttp.ClientError:
        return None


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
    await process.wait()


async def test_serve_drains_on_sigterm_and_finishes_requests_in_flight(tmp_path: Path) -> None:
    sandbox_port, port, admin_port = free_port(), free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    gateway_url = f"http://127.0.0.1:{port}"
    ready_url = f"http://127.0.0.1:{admin_port}/readyz"
    server = {"port": port, "admin_port": admin_port, "drain_s": 0.5}
    path = write_config(tmp_path, base_url=sandbox_url, server=server)
    order_headers = {"apikey": KEYS["acme"]}
    processes: list[asyncio.subprocess.Process] = []
    log_path = tmp_path / "processes.log"

    with log_path.open("wb") as log:

        async def start(*args: str) -> asyncio.subprocess.Process:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", *args,
                cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=log,
            )  # fmt: skip
            processes.append(process)
            return process

        try:
            async with aiohttp.ClientSession() as session:
                await start("sandbox", "--port", str(sandbox_port))
                listing = f"{sandbox_url}/_sandbox/order-requests"

                async def sandbox_up() -> bool:
                    return await status_of(session, listing) == 200

                await wait_for(sandbox_up, "the sandbox")
                gateway = await start("serve", "--config", str(path))

                async def ready() -> bool:
                    assert gateway.returncode is None, log_path.read_text()
                    return await status_of(session, ready_url) == 200

                await wait_for(ready, "/readyz 200")

                order_url = f"{gateway_url}/api/v1/external-order"
                first = {"external_reference": "SERVE-1", "customer_name": "A", "items": [
                    {"name": "Ibuprofen", "quantity": 1}
                ]}  # fmt: skip
                async with session.post(order_url, json=first, headers=order_headers) as reply:
                    assert reply.status == 200, await reply.text()
                async with session.get(listing) as response:
                    seen = await response.json()
                assert [r["envelope"]["external_reference"] for r in seen["order_requests"]] == [
                    "SERVE-1"
                ]

                slow_answer = {"id": "slow-1", "status": "pending", "message": "ok"}
                fault = {"status": 200, "body": slow_answer, "delay_s": 1.0}
                async with session.post(f"{sandbox_url}/_sandbox/faults", json=fault) as response:
                    assert response.status == 201

                async def send_slow() -> tuple[int, Any]:
                    body = {**first, "external_reference": "SERVE-2"}
                    async with session.post(order_url, json=body, headers=order_headers) as reply:
                        return reply.status, await reply.json()

                in_flight = asyncio.create_task(send_slow())

                async def arrived() -> bool:
                    async with session.get(listing) as response:
                        return (await response.json())["order_request_attempts"] == 2

                await wait_for(arrived, "the slow request at the sandbox")
                gateway.send_signal(signal.SIGTERM)

                async def draining() -> bool:
                    return await status_of(session, ready_url) == 503

                await wait_for(draining, "/readyz 503 while draining", within_s=2.0)
                assert not in_flight.done()

                status, body = await asyncio.wait_for(in_flight, timeout=10)
                assert status == 200
                assert body == slow_answer
                assert await asyncio.wait_for(gateway.wait(), timeout=10) == 0
        finally:
            for process in processes:
                await stop(process)


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "gateway"], [str(Path(sys.executable).with_name("gateway"))]],
    ids=["python -m gateway", "gateway"],
)
async def test_sigterm_while_serve_starts_is_honoured_once_it_serves_and_exits_0(
    tmp_path: Path, command: list[str]
) -> None:
    port, admin_port = free_port(), free_port()
    path = write_config(tmp_path, server={"port": port, "admin_port": admin_port})
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, "serve", "--config", str(path),
            cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=log,
        )  # fmt: skip
    try:

        async def latched() -> bool:
            return catches(process.pid, signal.SIGTERM)

        await wait_for(latched, "the start-up latch", within_s=5.0)
        # Still importing and starting: the server's own handlers are not there yet.
        assert b'"listening"' not in log_path.read_bytes()
        process.send_signal(signal.SIGTERM)

        assert await asyncio.wait_for(process.wait(), timeout=20) == 0, log_path.read_text()
        events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
        assert events.index("listening") < events.index("draining") < events.index("stopped")
    finally:
        await stop(process)
