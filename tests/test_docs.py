"""The documents partners and operators read say the same as the code."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from gateway import errors

ROOT = Path(__file__).resolve().parent.parent
# The canonical document is packaged with the code (the image copies only gateway/); docs/ keeps
# a copy where readers of the repository look for it.
OPENAPI_FILE = ROOT / "gateway" / "openapi.json"
OPENAPI = json.loads(OPENAPI_FILE.read_text(encoding="utf-8"))
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Base classes whose code no answer carries as such.
ABSTRACT = {errors.PartnerError, errors.UpstreamError, errors.ConfigError}


def answer_codes() -> set[str]:
    seen: set[str] = {errors.GatewayError.code}
    todo = list(errors.GatewayError.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls not in ABSTRACT:
            seen.add(cls.code)
    return seen


def test_openapi_lists_every_error_code_the_gateway_can_answer() -> None:
    enum = OPENAPI["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert set(enum) == answer_codes()


def test_docs_openapi_is_the_packaged_document() -> None:
    copy = ROOT / "docs" / "openapi.json"
    assert copy.read_bytes() == OPENAPI_FILE.read_bytes(), (
        "edit gateway/openapi.json, then: cp gateway/openapi.json docs/openapi.json"
    )


def test_the_packaged_document_is_in_every_install() -> None:
    # The image installs a wheel built from gateway/ alone: the document must be package data.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "openapi.json" in pyproject["tool"]["setuptools"]["package-data"]["gateway"]


def test_readme_error_table_names_every_error_code() -> None:
    missing = {code for code in answer_codes() if f"`{code}`" not in README}
    assert not missing


def test_readme_documents_every_key_of_the_example_configuration() -> None:
    example = tomllib.loads((ROOT / "config" / "example.toml").read_text(encoding="utf-8"))
    # A profile's keys are payload field names (its mapping), not configuration keys.
    profiles = example.pop("profiles")
    keys = {key for table in example.values() for key in _keys(table)}
    keys |= {"keep_unmapped"} & _keys(profiles)
    missing = {key for key in keys if f"`{key}`" not in README}
    assert not missing


def _keys(table: object) -> set[str]:
    if not isinstance(table, dict):
        return set()
    found: set[str] = set()
    for key, value in table.items():
        if isinstance(value, dict):
            found |= _keys(value)  # [shops.berlin] → its keys, not "berlin"
        else:
            found.add(key)
    return found
