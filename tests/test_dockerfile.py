"""The container: no Docker engine here, so the Dockerfile's promises are checked one by one,
and the command the image runs (and its HEALTHCHECK) are run for real on loopback.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import ENVIRON, REPO_ROOT
from test_cli import free_port, status_of, wait_for, write_config

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")


def instruction(name: str) -> str:
    """The last ``NAME`` instruction of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    final_stage = text.rsplit("\nFROM ", 1)[1]
    found = re.findall(rf"^{name}\s+(.+)$", final_stage, re.MULTILINE)
    assert found, f"no {name} in the final stage"
    return str(found[-1]).strip()


def test_final_image_runs_as_a_non_root_user_with_a_high_uid() -> None:
    uid, _, gid = instruction("USER").partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it; high, so it is no host user.
    assert uid.isdigit() and int(uid) >= 10000
    assert gid.isdigit() and int(gid) != 0


def test_data_directory_is_a_volume_owned_by_the_image_user() -> None:
    uid, _, gid = instruction("USER").partition(":")
    assert "/var/lib/telemed-gateway" in json.loads(instruction("VOLUME"))
    run = instruction("RUN")
    created = re.search(r"install --directory (.*?) /var/lib/telemed-gateway", run)
    assert created, "the data directory is created in the image"
    assert f"--owner={uid}" in created.group(1) and f"--group={gid}" in created.group(1)


def test_final_stage_installs_no_compiler() -> None:
    final_stage = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    assert not re.search(r"\b(gcc|build-essential|g\+\+|clang)\b", final_stage)


def test_both_ports_are_exposed_and_config_path_is_documented() -> None:
    assert set(instruction("EXPOSE").split()) == {"8080", "9091"}
    assert "GATEWAY_CONFIG=/etc/telemed-gateway/gateway.toml" in instruction("ENV")
    assert "/etc/telemed-gateway/gateway.toml" in (REPO_ROOT / "README.md").read_text()


@pytest.mark.timeout(60)
async def test_the_image_command_serves_and_its_healthcheck_passes(tmp_path: Path) -> None:
    # ENTRYPOINT + CMD, with the config found through $GATEWAY_CONFIG as in the image.
    command = json.loads(instruction("ENTRYPOINT")) + json.loads(instruction("CMD"))
    assert command == ["gateway", "serve"]
    port, admin_port = free_port(), free_port()
    config = write_config(
        tmp_path, server={"host": "127.0.0.1", "port": port, "admin_port": admin_port}
    )
    env = {**ENVIRON, "GATEWAY_CONFIG": str(config), "PATH": str(Path(sys.executable).parent)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *command[1:], env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                return await status_of(session, f"http://127.0.0.1:{admin_port}/readyz") == 200

            await wait_for(ready, "/readyz 200")
        # HEALTHCHECK CMD ["python", "-c", "..."]: the same code, pointed at this admin port.
        healthcheck = json.loads(instruction("HEALTHCHECK").split("CMD", 1)[1])
        assert healthcheck[:2] == ["python", "-c"]
        code = healthcheck[2].replace(":9091/", f":{admin_port}/")
        check = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        assert await check.wait() == 0
        assert instruction("STOPSIGNAL") == "SIGTERM"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
