"""The configuration of section 11: what ``check-config`` and ``serve`` refuse (exit 2, one line
naming the key), and what they accept."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from webhook_kit import ALPHA_WHSEC, ENVIRON, webhooks_toml

from gateway.cli import EXIT_CONFIG, EXIT_OK, main
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.runtime import build_runtime

MANAGER = "http://127.0.0.1:9"
CALLBACK = "https://partner.example/hooks"


def toml(tmp_path: Path, callback: str | None = CALLBACK, **sections: dict[str, object]) -> str:
    return webhooks_toml(MANAGER, tmp_path / "outbox.db", callback, **sections)  # type: ignore[arg-type]


def load(text: str, **environ: str) -> None:
    build_runtime(parse_config(text, environ={**ENVIRON, **environ}))


def test_the_test_configuration_is_valid(tmp_path: Path) -> None:
    config = parse_config(toml(tmp_path), environ=ENVIRON)
    runtime = build_runtime(config)
    assert set(runtime.callbacks) == {"alpha", "gamma"}
    assert runtime.callbacks["alpha"].key == base64.b64decode(ALPHA_WHSEC.removeprefix("whsec_"))
    assert {org for org, _ in runtime.webhook_secrets} == {"demo-org", "other-org"}
    assert config.shops["main"].webhook_secret is not None
    assert "webhook_secret" not in config.shops["main"].model_dump()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        # a callback without a secret
        (lambda t: t.replace('callback_secret_env = "CB_ALPHA"\n', ""), "partners.alpha"),
        # a secret that is not whsec_
        (lambda t: t, "partners.alpha.callback_secret_env"),
        # webhooks without the outbox
        (
            lambda t: t.replace("[outbox]\nenabled = true", "[outbox]\nenabled = false"),
            "webhooks.enabled",
        ),  # fmt: skip
        # a secret in the file
        (
            lambda t: t.replace('webhook_secret_env = "WH_MAIN"', 'webhook_secret = "x"'),
            "shops.main",
        ),  # fmt: skip
        # both env and file
        (
            lambda t: t.replace(
                'webhook_secret_env = "WH_MAIN"',
                'webhook_secret_env = "WH_MAIN"\nwebhook_secret_file = "/x"',
            ),
            "shops.main",
        ),  # fmt: skip
        (
            lambda t: t.replace('webhook_secret_env = "WH_MAIN"', 'webhook_secret_env = "UNSET"'),
            "shops.main.webhook_secret_env",
        ),  # fmt: skip
        (lambda t: t.replace("[webhooks]\n", "[webhooks]\nsauce = 1\n"), "webhooks.sauce"),
        (
            lambda t: t.replace('"127.0.0.0/8"', '"not-a-network"'),
            "webhooks.callback_allow_networks",
        ),
    ],
)
def test_refused_configurations_name_the_key(tmp_path: Path, change: object, named: str) -> None:
    text = change(toml(tmp_path))  # type: ignore[operator]
    environ = {"CB_ALPHA": "not-a-whsec-secret"} if named.endswith("callback_secret_env") else {}
    with pytest.raises(ConfigError) as caught:
        load(text, **environ)
    assert str(caught.value).split(":")[0].endswith(named) or named in str(caught.value)


def test_callbacks_without_the_outbox_are_refused(tmp_path: Path) -> None:
    text = toml(tmp_path, webhooks={"enabled": False}).replace(
        "[outbox]\nenabled = true", "[outbox]\nenabled = false"
    )
    with pytest.raises(ConfigError, match=r"partners\.alpha\.callback_url: callbacks need"):
        load(text)


@pytest.mark.parametrize(
    ("url", "webhooks", "reason"),
    [
        ("http://partner.example/hooks", {"callback_allow_http": False}, "only https"),
        ("https://10.0.0.7/hooks", {}, "private address"),
        ("https://127.0.0.1/hooks", {"callback_allow_networks": []}, "loopback"),
        ("https://partner.example:8443/hooks", {"callback_allow_ports": []}, "port"),
        ("https://user:pw@partner.example/hooks", {}, "credentials"),
        ("not a url", {}, "absolute"),
    ],
)
def test_callback_urls_the_policy_refuses_are_refused_at_start(
    tmp_path: Path, url: str, webhooks: dict[str, object], reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(toml(tmp_path, callback=url, webhooks=webhooks))
    assert str(caught.value).startswith("partners.alpha.callback_url: ")
    assert reason in str(caught.value)


def test_http_callback_on_loopback_is_accepted_when_allowed(tmp_path: Path) -> None:
    load(toml(tmp_path, callback="http://127.0.0.1:9999/hooks"))


def test_check_config_refuses_with_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "gateway.toml"
    path.write_text(toml(tmp_path, callback="http://partner.example/hooks",
                         webhooks={"callback_allow_http": False}))  # fmt: skip
    assert main(["check-config", "--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "partners.alpha.callback_url" in err
    assert ALPHA_WHSEC not in err


def test_check_config_summarises_webhooks_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "gateway.toml"
    path.write_text(toml(tmp_path))
    assert main(["check-config", "--config", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "webhooks: POST /webhooks/pharmaone, subscribed shops: main, other" in out
    assert "partner alpha: shop main, pdf fetch, callbacks on" in out
    assert all(secret not in out for secret in ENVIRON.values())


def test_new_secret_webhook_is_a_whsec_secret_the_config_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new-secret", "webhook"]) == EXIT_OK
    secret = capsys.readouterr().out.strip()
    load(toml(tmp_path), CB_ALPHA=secret)


def test_sandbox_webhook_url_needs_its_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SANDBOX_WEBHOOK_SECRET", raising=False)
    assert main(["sandbox", "--webhook-url", "http://127.0.0.1:1/x"]) == EXIT_CONFIG
    assert "SANDBOX_WEBHOOK_SECRET" in capsys.readouterr().err
