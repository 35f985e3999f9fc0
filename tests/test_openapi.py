"""The published API checked from outside: Schemathesis against a real gateway and the sandbox.

``gateway sandbox`` and ``gateway serve`` run as real processes on 127.0.0.1 (free ports), started
and stopped by PID. Schemathesis (its CLI, as a user would run it) reads the document the gateway
serves, with its ``servers`` replaced by the gateway's loopback URL so that nothing is looked up
elsewhere, and tests every operation in it with all of its checks, a bounded number of examples
and a fixed seed. Operations added to the document later are tested too; a configuration they
need goes into ``EXTRA_CONFIG`` (the outbox is on, for the order status endpoint; webhooks are on,
with a subscription secret Schemathesis does not know, so it sees 401 invalid_signature). And every
route the partner port serves must be in the document: a new endpoint cannot go unpublished.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from conftest import KEYS, REPO_ROOT, gateway_toml, load_test_config
from cryptography.fernet import Fernet
from test_cli import child_env, free_port, status_of, wait_for

from gateway.app import create_app
from gateway.routes import OPENAPI_PATH, load_openapi_document

SCHEMATHESIS: Final = Path(sys.executable).with_name("schemathesis")
# The partner whose prescription URLs are forwarded, not fetched: generated URLs must not make
# the gateway look up hosts that are not loopback.
PARTNER_KEY: Final = KEYS["fwd"]
# The outbox on (SQLite in the test's directory), so that the status endpoint answers for real.
OUTBOX_KEY: Final = Fernet.generate_key().decode()
EXTRA_CONFIG: Final = """
[outbox]
enabled = true
path = "{tmp}/outbox.db"
key_env = "SCHEMATHESIS_OUTBOX_KEY"

[webhooks]
enabled = true

[shops.subscribed]
org_id = "demo-org"
shop_id = "demo-shop"
webhook_secret_env = "SCHEMATHESIS_WEBHOOK_SECRET"
"""
MAX_EXAMPLES: Final = 25
SEED: Final = 20261202
START_S: Final = 15.0
# Each check Schemathesis has runs, except (with the reason):
EXCLUDED_CHECKS: Final[dict[str, str]] = {}
# Schemathesis's own settings for this run (schemathesis.toml), with the reason for each.
SETTINGS: Final = """
[checks.positive_data_acceptance]
# A JSON Schema cannot say all of the gateway's rules: an order needs a customer and lines or a
# prescription (422 validation_failed), an uploaded prescription must be a PDF (422), a reference
# already used with another body is a conflict (409). Those refusals are the documented ones.
expected-statuses = ["2XX", "401", "403", "404", "409", "422"]
"""


@asynccontextmanager
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Processes started by the test; each is ended by its PID at the end (SIGTERM, then kill)."""
    started: list[asyncio.subprocess.Process] = []
    try:
        yield started
    finally:
        for process in started:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def start(
    started: list[asyncio.subprocess.Process], log: Path, *args: str
) -> asyncio.subprocess.Process:
    # Each from the repository (the gateway's modules) or the log's directory (Schemathesis's
    # own files stay out of the work tree).
    cwd = REPO_ROOT if args[0] == sys.executable else log.parent
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *args,
            cwd=cwd,
            env={
                **child_env(),
                "SCHEMATHESIS_OUTBOX_KEY": OUTBOX_KEY,
                "SCHEMATHESIS_WEBHOOK_SECRET": "schemathesis-webhook-secret",
            },
            stdout=out,
            stderr=out,
        )
    started.append(process)
    return process


def schemathesis_command(schema: Path, base_url: str, config: Path) -> Sequence[str]:
    command = [str(SCHEMATHESIS), "--config-file", str(config), "run", str(schema)]
    command += ["--url", base_url, "--header", f"apikey: {PARTNER_KEY}"]
    command += ["--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED)]
    command += ["--generation-database", "none", "--workers", "1", "--no-color"]
    command += ["--request-timeout", "10", "--phases", "examples,coverage,fuzzing,stateful"]
    if EXCLUDED_CHECKS:
        command += ["--exclude-checks", ",".join(EXCLUDED_CHECKS)]
    return command


@pytest.mark.timeout(240)
async def test_schemathesis_finds_no_failure_in_the_published_api(tmp_path: Path) -> None:
    sandbox_port, port, admin_port = free_port(), free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    config = tmp_path / "gateway.toml"
    server = {"port": port, "admin_port": admin_port}
    text = gateway_toml(f"http://127.0.0.1:{sandbox_port}", server=server, manager={"retries": 0})
    config.write_text(text + EXTRA_CONFIG.format(tmp=tmp_path), encoding="utf-8")
    log = tmp_path / "processes.log"

    async with processes() as started, aiohttp.ClientSession() as session:
        gateway = sys.executable, "-m", "gateway"
        await start(started, log, *gateway, "sandbox", "--port", str(sandbox_port))
        serving = await start(started, log, *gateway, "serve", "--config", str(config))

        async def ready() -> bool:
            assert serving.returncode is None, log.read_text()
            admin = await status_of(session, f"http://127.0.0.1:{admin_port}/readyz")
            return admin == 200 and await status_of(session, f"{base_url}{OPENAPI_PATH}") == 200

        await wait_for(ready, "/readyz 200", START_S)
        async with session.get(f"{base_url}{OPENAPI_PATH}") as response:
            document = await response.json()
        # The document names the partners' shop URLs; this run goes to loopback only.
        document["servers"] = [{"url": base_url}]
        schema = tmp_path / "openapi.json"
        schema.write_text(json.dumps(document), encoding="utf-8")
        settings = tmp_path / "schemathesis.toml"
        settings.write_text(SETTINGS, encoding="utf-8")

        fuzzer = await start(
            started,
            tmp_path / "schemathesis.log",
            *schemathesis_command(schema, base_url, settings),
        )
        code = await fuzzer.wait()

        report = (tmp_path / "schemathesis.log").read_text(errors="replace")
        assert code == 0, report[-20000:]
        assert "No issues found" in report or "passed" in report, report[-5000:]
        assert serving.returncode is None, log.read_text()


def test_every_partner_route_is_in_the_published_document() -> None:
    app = create_app(load_test_config("http://127.0.0.1:9"))
    document = json.loads(load_openapi_document())
    served = {
        (route.method.lower(), route.resource.canonical.rstrip("/"))
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {
        (method, path) for path, operations in document["paths"].items() for method in operations
    }

    assert served <= documented
