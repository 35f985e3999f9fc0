"""The Kubernetes examples in deploy/: what a scanner cannot see, checked against the gateway.

Checkov (``make scan``, part of ``make test``) checks the manifests' security settings; these tests
check that they fit this gateway: its configuration loads, every secret file it names is mounted,
the UID is the image's, and the places it writes are writable.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

from gateway.config import parse_config

EXAMPLES = sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
# What each secret file holds, for loading the examples' configurations.
SECRETS = {
    "redis_url_file": "redis://:pw@redis:6379/0",
    "key_file": base64.urlsafe_b64encode(b"k" * 32).decode(),  # a Fernet key
}
SECRET_KEYS = re.compile(r'^\s*(\w+_file)\s*=\s*"([^"]+)"', re.MULTILINE)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def workloads(path: Path) -> Iterator[dict[str, Any]]:
    yield from (doc for doc in documents(path) if doc["kind"] == "Deployment")


def gateway_container(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod spec and container that run the gateway image."""
    for deployment in workloads(path):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            if "telemed-gateway:" in container["image"]:
                return pod, container
    raise AssertionError(f"{path.name}: no telemed-gateway container")


def gateway_toml(path: Path) -> str:
    maps = [d for d in documents(path) if d["kind"] == "ConfigMap" and "gateway.toml" in d["data"]]
    assert len(maps) == 1
    text: str = maps[0]["data"]["gateway.toml"]
    return text


def image_uid() -> int:
    user = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)[-1]
    return int(user.split(":")[0])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configuration_loads_with_its_mounted_secret_files(
    path: Path, tmp_path: Path
) -> None:
    pod, container = gateway_container(path)
    text = gateway_toml(path).replace('"…"', '"' + "0" * 64 + '"')
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    files = SECRET_KEYS.findall(text)
    assert files, "the example names its secrets by file"
    for key, secret_path in files:
        # Every secret file the configuration names lies in a volume of this container.
        assert any(secret_path.startswith(mount + "/") for mount in mounts), (key, secret_path)
        local = tmp_path / secret_path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(SECRETS.get(key, "secret"), "utf-8")
        text = text.replace(f'"{secret_path}"', f'"{local}"')

    config = parse_config(text, environ={})

    assert config.server.admin_port == 9091 and config.server.port == 8080
    if config.outbox.enabled and config.state.backend == "memory":
        # The SQLite file lies on a writable volume of this container.
        writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
        assert any(config.outbox.path.startswith(mount + "/") for mount in writable)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_gateway_runs_as_the_images_user_with_only_tmp_and_its_data_writable(path: Path) -> None:
    pod, container = gateway_container(path)
    uid = image_uid()
    assert uid >= 10000
    assert pod["securityContext"]["runAsUser"] == uid == container["securityContext"]["runAsUser"]
    assert pod["securityContext"]["fsGroup"] == uid  # secret files and volumes readable
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {
        m["mountPath"]: volumes[m["name"]]
        for m in container["volumeMounts"]
        if not m.get("readOnly")
    }
    assert "emptyDir" in writable["/tmp"]  # serve --workers N: the metrics directory (tempfile)
    assert set(writable) <= {"/tmp", "/var/lib/telemed-gateway"}


def test_sidecar_keeps_the_outbox_on_a_persistent_volume() -> None:
    path = REPO_ROOT / "deploy" / "kubernetes" / "sidecar.yaml"
    pod, container = gateway_container(path)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [
        m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/telemed-gateway"
    ]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    claims = [d for d in documents(path) if d["kind"] == "PersistentVolumeClaim"]
    assert claim in {c["metadata"]["name"] for c in claims}
    assert "/var/lib/telemed-gateway" in DOCKERFILE.split("\nVOLUME", 1)[1].splitlines()[0]


def test_persistent_redis_and_no_token_on_its_disk() -> None:
    path = REPO_ROOT / "deploy" / "kubernetes" / "chain.yaml"
    redis_conf = next(
        d["data"]["redis.conf"] for d in documents(path) if "redis.conf" in d.get("data", {})
    )
    assert "appendonly yes" in redis_conf
    assert re.search(r"^appendfsync (always|everysec)$", redis_conf, re.MULTILINE)
    assert parse_toml_bool(gateway_toml(path), "share_tokens") is False


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_no_secret_reaches_a_container_as_an_environment_variable(path: Path) -> None:
    for deployment in workloads(path):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), env["name"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_skipped_check_says_why(path: Path) -> None:
    for doc in documents(path):
        for name, value in doc["metadata"].get("annotations", {}).items():
            if not name.startswith("checkov.io/skip"):
                continue
            # Checkov splits the annotation at "=": exactly one, then the reason.
            check, reason = value.split("=")
            assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
            assert len(reason.split()) >= 8, f"{check}: the reason is too short"


def parse_toml_bool(text: str, key: str) -> bool | None:
    found = re.search(rf"^\s*{key}\s*=\s*(true|false)", text, re.MULTILINE)
    return None if found is None else found.group(1) == "true"
