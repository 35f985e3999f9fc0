"""Several gateway processes sharing one Redis: real ``python -m gateway serve`` processes.

Two independent processes on two ports, and ``serve --workers 2`` (one supervisor, two workers on
one port with SO_REUSEPORT), all in front of one sandbox running in the test's event loop. The
promises of the delivery issue must hold across processes: one Manager call per reference, one
rate limit per partner, ``503 state_unavailable`` (and nothing forwarded) while Redis is down,
service again by itself once it is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from conftest import (
    ENVIRON,
    KEYS,
    REPO_ROOT,
    RedisServer,
    flat_order,
    free_port,
    gateway_toml,
    toml_table,
)
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpServer
from test_cli import catches

from gateway.auth import hash_key
from gateway.sandbox import SANDBOX_KEY, SandboxState, create_sandbox_app

BURST_KEY: Final = "burst-partner-key-0123456789"
BURST_RATE: Final = 4
START_S: Final = 15.0  # a cold interpreter importing the gateway, twice in parallel
STOP_S: Final = 10.0


@pytest.fixture
async def sandbox(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[str, SandboxState]]:
    server = await aiohttp_server(create_sandbox_app(), host="127.0.0.1")
    yield f"http://127.0.0.1:{server.port}", server.app[SANDBOX_KEY]


def write_config(
    path: Path,
    sandbox_url: str,
    *,
    port: int,
    admin_port: int,
    backend: str = "redis",
    extra: str = "",
) -> Path:
    """The test configuration plus a partner ``burst`` limited to ``BURST_RATE`` per minute
    (and ``extra`` TOML tables)."""
    text = gateway_toml(
        sandbox_url,
        server={"port": port, "admin_port": admin_port},
        manager={"retries": 0, "timeout_s": 5},
    )
    text += "\n" + toml_table(
        "partners.burst",
        {"shop": "main", "key_sha256": hash_key(BURST_KEY), "rate_per_min": BURST_RATE},
    )
    text += "\n" + toml_table("state", {"backend": backend}) + extra
    path.write_text(text, encoding="utf-8")
    return path


def child_env(redis_url: str | None) -> dict[str, str]:
    env = {**os.environ, **ENVIRON}
    for name in ("GATEWAY_CONFIG", "PROMETHEUS_MULTIPROC_DIR", "REDIS_URL"):
        env.pop(name, None)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return env


@dataclass
class Served:
    """One ``gateway serve`` process (or supervisor) and where it listens."""

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path

    @property
    def order_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/external-order"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, within_s: float) -> None:
    """Poll ``check`` until it is true (bounded): another process has no event to wait on."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def status_of(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as response:
            return response.status
    except aiohttp.ClientError:
        return None


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    replayed: bool


async def post(
    session: aiohttp.ClientSession, url: str, body: object, *, key: str = KEYS["acme"]
) -> Answer:
    async with session.post(url, json=body, headers={"apikey": key}) as response:
        return Answer(
            response.status,
            await response.json(),
            response.headers.get("Idempotent-Replayed") == "true",
        )


def order(reference: str) -> dict[str, object]:
    return flat_order(external_reference=reference)


def references(state: SandboxState) -> list[object]:
    envelopes: list[Any] = [request["envelope"] for request in state.received]
    return [envelope["external_reference"] for envelope in envelopes]


@asynccontextmanager
async def serving(
    tmp_path: Path,
    sandbox_url: str,
    redis_url: str,
    *,
    count: int = 1,
    workers: int = 1,
    extra_toml: str = "",
    extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[list[Served]]:
    """``count`` gateway processes, ready; SIGTERM at the end (exit 0 asserted); kill on error."""
    started: list[Served] = []
    try:
        for i in range(count):
            port, admin_port = free_port(), free_port()
            config = write_config(
                tmp_path / f"gateway-{i}.toml",
                sandbox_url,
                port=port,
                admin_port=admin_port,
                extra=extra_toml,
            )
            log = tmp_path / f"gateway-{i}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "serve", "--config", str(config),
                    "--workers", str(workers),
                    cwd=REPO_ROOT, env={**child_env(redis_url), **(extra_env or {})},
                    stdout=out, stderr=out,
                )  # fmt: skip
            started.append(Served(process, port, admin_port, log))
        async with aiohttp.ClientSession() as session:
            for served in started:

                async def ready(served: Served = served) -> bool:
                    assert served.process.returncode is None, served.log.read_text()
                    return await status_of(session, served.admin_url("/readyz")) == 200

                await wait_for(ready, f"/readyz 200 on {served.admin_port}", START_S)
        yield started
        # Those the test has not ended itself: SIGTERM drains and exits 0.
        running = [served for served in started if served.process.returncode is None]
        codes = await asyncio.gather(*(terminate(served.process) for served in running))
        assert codes == [0] * len(running), [served.log.read_text() for served in running]
    finally:
        for served in started:
            if served.process.returncode is None:
                served.process.kill()
            await served.process.wait()


async def terminate(process: asyncio.subprocess.Process) -> int | None:
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), timeout=STOP_S)
    except TimeoutError:
        return None


async def post_until_accepted(
    session: aiohttp.ClientSession, url: str, body: object, within_s: float = 10.0
) -> list[Answer]:
    """POST ``body`` again and again (bounded) until it is answered 200; every answer in turn."""
    answers: list[Answer] = []

    async def accepted() -> bool:
        answers.append(await post(session, url, body))
        return answers[-1].status == 200

    await wait_for(accepted, f"{url} to accept an order again", within_s)
    return answers


# --- two processes, one Redis -------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_two_processes_make_one_manager_call_per_reference_and_share_rate_limits(
    tmp_path: Path, sandbox: tuple[str, SandboxState], redis_url: str
) -> None:
    sandbox_url, state = sandbox
    async with (
        serving(tmp_path, sandbox_url, redis_url, count=2) as (a, b),
        aiohttp.ClientSession() as session,
    ):
        urls = [a.order_url, b.order_url]

        same = await asyncio.gather(
            *(post(session, urls[i % 2], order("DUP-1")) for i in range(10))
        )

        assert references(state) == ["DUP-1"]
        fresh = [answer for answer in same if answer.status == 200 and not answer.replayed]
        assert len(fresh) == 1
        for answer in same:
            assert answer.status in (200, 409), answer
            if answer.status == 409:
                assert answer.body["error"] == "request_in_progress"
            else:
                assert answer.body == fresh[0].body

        limited = await asyncio.gather(
            *(
                post(session, urls[i % 2], order(f"BURST-{i}"), key=BURST_KEY)
                for i in range(2 * BURST_RATE)
            )
        )

        statuses = sorted(answer.status for answer in limited)
        assert statuses == [200] * BURST_RATE + [429] * BURST_RATE
        assert {x.body["error"] for x in limited if x.status == 429} == {"rate_limited"}
        assert len(state.received) == 1 + BURST_RATE


@pytest.mark.timeout(60)
async def test_redis_outage_gives_state_unavailable_from_both_and_service_resumes(
    tmp_path: Path,
    sandbox: tuple[str, SandboxState],
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    sandbox_url, state = sandbox
    async with (
        serving(tmp_path, sandbox_url, redis_url, count=2) as gateways,
        aiohttp.ClientSession() as session,
    ):
        for i, served in enumerate(gateways):
            assert (await post(session, served.order_url, order(f"BEFORE-{i}"))).status == 200

        await asyncio.to_thread(redis_server.stop)

        for i, served in enumerate(gateways):
            answer = await post(session, served.order_url, order(f"DURING-{i}"))
            assert answer.status == 503, answer
            assert answer.body["error"] == "state_unavailable"
            assert answer.body["request_id"]
            assert await status_of(session, served.admin_url("/readyz")) == 503
        assert references(state) == ["BEFORE-0", "BEFORE-1"]
        assert state.order_request_attempts == 2

        await asyncio.to_thread(redis_server.start)

        for i, served in enumerate(gateways):
            answers = await post_until_accepted(session, served.order_url, order(f"DURING-{i}"))
            assert {a.status for a in answers[:-1]} <= {503}
            assert await status_of(session, served.admin_url("/readyz")) == 200
        assert references(state) == ["BEFORE-0", "BEFORE-1", "DURING-0", "DURING-1"]


# --- serve --workers 2 --------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """The children of ``pid``, from /proc (every thread's list), else from ``ps``."""
    tasks = Path(f"/proc/{pid}/task")
    lists = [task / "children" for task in tasks.iterdir()] if tasks.is_dir() else []
    if lists and all(path.exists() for path in lists):
        return sorted(int(child) for path in lists for child in path.read_text().split())
    done = subprocess.run(
        ["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True, check=False
    )
    return sorted(int(child) for child in done.stdout.split())


def listening_sockets(port: int) -> set[str]:
    """Inodes of the IPv4 sockets listening on ``port`` (any process), from /proc/net/tcp."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            inodes.add(inode)
    return inodes


def sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def is_running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def log_events(path: Path) -> list[str]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            events.append(str(entry.get("event")))
    return events


def requests_total(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total"
    )


async def start_workers(served: Served) -> list[int]:
    """Wait until both workers of a ``--workers 2`` supervisor listen; their PIDs."""

    async def both_listening() -> bool:
        return log_events(served.log).count("listening") == 2

    await wait_for(both_listening, "two workers listening", START_S)
    workers = child_pids(served.process.pid)
    assert len(workers) == 2
    return workers


def metrics_dir_of(worker: int) -> Path:
    line = command_line(worker)
    return Path(line[line.index("--metrics-dir") + 1])


@pytest.mark.timeout(60)
async def test_serve_workers_2_shares_one_port_aggregates_metrics_and_stops_on_sigterm(
    tmp_path: Path, sandbox: tuple[str, SandboxState], redis_url: str
) -> None:
    sandbox_url, state = sandbox
    async with serving(tmp_path, sandbox_url, redis_url, workers=2) as [supervisor]:
        workers = await start_workers(supervisor)
        listeners = listening_sockets(supervisor.port)
        assert len(listeners) == 2  # one socket per worker, on the same port (SO_REUSEPORT)
        for worker in workers:
            assert "--reuse-port" in command_line(worker)
            assert sockets_of(worker) & listeners
        assert not sockets_of(supervisor.process.pid) & listeners  # it serves nothing itself
        metrics_dir = metrics_dir_of(workers[0])

        # A new connection per request, so that the kernel spreads them over the workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            answers = await asyncio.gather(
                *(post(session, supervisor.order_url, order(f"W-{i}")) for i in range(20))
            )
            assert [a.status for a in answers] == [200] * 20
            assert sorted(references(state)) == sorted(f"W-{i}" for i in range(20))

            async with session.get(supervisor.admin_url("/metrics")) as response:
                assert response.status == 200
                assert requests_total(await response.text()) >= 20

            # The console says which worker answered (each keeps its own recent requests).
            answered: set[int] = set()
            for _ in range(4):
                async with session.get(supervisor.admin_url("/")) as response:
                    found = re.search(r"answered by worker pid (\d+)", await response.text())
                    assert found, "the console does not name the worker"
                    answered.add(int(found.group(1)))
            assert answered and answered <= set(workers)
        # leaving the block sends SIGTERM to the supervisor and asserts its exit code 0

    for worker in workers:
        assert not is_running(worker), f"worker {worker} outlived the supervisor"
    assert log_events(supervisor.log).count("stopped") == 2  # both drained, none was killed
    assert not metrics_dir.exists()


@pytest.mark.timeout(60)
async def test_serve_workers_relays_sighup_and_stops_every_worker_when_one_dies(
    tmp_path: Path, sandbox: tuple[str, SandboxState], redis_url: str
) -> None:
    sandbox_url, _ = sandbox
    async with serving(tmp_path, sandbox_url, redis_url, workers=2) as [supervisor]:
        workers = await start_workers(supervisor)
        metrics_dir = metrics_dir_of(workers[0])

        supervisor.process.send_signal(signal.SIGHUP)

        async def both_reloaded() -> bool:
            return log_events(supervisor.log).count("config_reloaded") == 2

        await wait_for(both_reloaded, "both workers reloading", STOP_S)
        assert supervisor.process.returncode is None

        os.kill(workers[0], signal.SIGKILL)

        code = await asyncio.wait_for(supervisor.process.wait(), timeout=STOP_S)
        assert code == 1  # the orchestrator restarts a whole gateway
        assert not is_running(workers[1])
        assert log_events(supervisor.log).count("stopped") == 1  # the survivor drained
        assert not metrics_dir.exists()


def test_serve_workers_2_with_memory_state_exits_2_naming_redis(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "gateway.toml",
        "http://127.0.0.1:9",
        port=free_port(),
        admin_port=free_port(),
        backend="memory",
    )

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2"],
        cwd=REPO_ROOT,
        env=child_env(None),
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.returncode == 2
    assert "redis" in done.stderr
    assert done.stdout == ""


@pytest.mark.timeout(60)
async def test_sigterm_while_workers_start_drains_them_and_the_supervisor_exits_0(
    tmp_path: Path, sandbox: tuple[str, SandboxState], redis_url: str
) -> None:
    sandbox_url, _ = sandbox
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path / "gateway.toml", sandbox_url, port=port, admin_port=admin_port)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2",
            cwd=REPO_ROOT, env=child_env(redis_url), stdout=out, stderr=out,
        )  # fmt: skip
    try:

        async def workers_latched() -> bool:
            workers = child_pids(process.pid)
            return len(workers) == 2 and all(catches(pid, signal.SIGTERM) for pid in workers)

        await wait_for(workers_latched, "both workers latching signals", START_S)
        assert "listening" not in log_events(log)  # still starting
        process.send_signal(signal.SIGTERM)

        assert await asyncio.wait_for(process.wait(), timeout=STOP_S * 2) == 0, log.read_text()
        assert log_events(log).count("stopped") == 2  # each served, then drained
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
