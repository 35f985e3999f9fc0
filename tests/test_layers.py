"""The architecture's direction of imports (STYLE.md): decisions in pure code, HTTP at the edge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
# Pure: mapping, validation, retry decisions, keys, errors, idempotency. No HTTP library at all.
PURE = [
    "models", "normalize", "retry", "auth", "errors", "idempotency", "codec", "tokens",
    "upstream_proxy",
    "console.view", "console.access", "console.page",
]  # fmt: skip
# The server side of aiohttp stays in the edge modules.
SERVER_EDGE = {
    "app", "routes", "middleware", "intake", "server", "gateway", "sandbox", "console.handlers",
}  # fmt: skip


def imports_of(module: str) -> set[str]:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from aiohttp import web` imports aiohttp.web
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def is_module(module: str) -> bool:
    base = PACKAGE / module.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def reachable(module: str) -> set[str]:
    """Every import reachable from ``module`` through the gateway's own modules."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in imports_of(current):
            if name in seen:
                continue
            seen.add(name)
            if name.startswith("gateway.") and is_module(name.removeprefix("gateway.")):
                todo.append(name.removeprefix("gateway."))
    return seen


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_use_no_http_library(module: str) -> None:
    http = {name for name in reachable(module) if name.split(".")[0] in {"aiohttp", "yarl"}}
    # tokens may import PyJWT; none of these may reach aiohttp, even through another module.
    assert not http, f"gateway.{module} reaches {sorted(http)}"


def test_only_edge_modules_import_the_aiohttp_server() -> None:
    offenders = set()
    for path in PACKAGE.rglob("*.py"):
        module = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        names = imports_of(module.removesuffix(".__init__"))
        uses_server = (
            any(n in ("aiohttp.web", "aiohttp.web_request") for n in names)
            or any(n == "aiohttp" for n in names)
            and "web" in path.read_text(encoding="utf-8").split("from aiohttp import", 1)[-1][:40]
        )
        if uses_server and module not in SERVER_EDGE:
            offenders.add(module)
    assert not offenders
