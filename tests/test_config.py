"""Tests for gateway.config: the operator's TOML file → validated Config, secrets resolved.

Every test builds its TOML as a string and passes its own ``environ``: nothing reads the real
environment or a file outside ``tmp_path`` (except the repo's documented example configs).
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

import pytest

from gateway.config import load_config, parse_config, resolve_config_path
from gateway.errors import ConfigError
from gateway.outbox.sealing import new_key

REPO = Path(__file__).resolve().parent.parent
HASH_A = "a" * 64
HASH_B = "b" * 64

MANAGER = """
[manager]
base_url = "https://manager.example"
"""

SHOP = """
[shops.berlin]
org_id = "org1"
shop_id = "shop1"
manager_key_env = "ORG1_MANAGER_KEY"
"""

PARTNER = f"""
[partners.drx]
shop = "berlin"
key_sha256 = "{HASH_A}"
"""

ENV = {"ORG1_MANAGER_KEY": "org1-secret"}


def shop_with_key_file(path: Path) -> str:
    return f'[shops.berlin]\norg_id = "o"\nshop_id = "s"\nmanager_key_file = "{path}"\n'


def config_error(text: str, environ: dict[str, str] | None = None) -> str:
    """The ConfigError message that ``text`` produces."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ=ENV if environ is None else environ)
    return str(caught.value)


# --- defaults -----------------------------------------------------------------------------------


def test_minimal_file_gets_documented_defaults() -> None:
    config = parse_config(MANAGER, environ={})

    assert (config.server.host, config.server.port, config.server.admin_port) == (
        "0.0.0.0",
        8080,
        9091,
    )
    assert config.server.max_body_bytes == 20 * 1024 * 1024
    assert (config.manager.api, config.manager.timeout_s, config.manager.retries) == ("v2", 15, 3)
    assert config.shops == {} and config.partners == {} and config.profiles == {}
    assert (config.pdf.max_mb, config.pdf.timeout_s, config.pdf.allow_http) == (10, 10, False)
    assert config.pdf.allow_networks == () and config.pdf.allow_hosts == ()
    assert config.idempotency.ttl_hours == 24
    assert (config.state.backend, config.state.share_tokens) == ("memory", False)
    assert (config.logging.level, config.logging.format) == ("info", "json")


def test_partner_defaults_and_shop_api_falls_back_to_manager_api() -> None:
    config = parse_config(MANAGER + SHOP + PARTNER, environ=ENV)

    partner = config.partners["drx"]
    assert (partner.pdf, partner.rate_per_min, partner.require_reference) == ("fetch", None, False)
    assert partner.source is None and partner.profile is None
    shop = config.shops["berlin"]
    assert shop.hosts == () and shop.accept_org_keys is False
    assert config.api_for(shop) == "v2"


def test_shop_api_overrides_manager_api() -> None:
    config = parse_config(MANAGER + SHOP + 'api = "v1"\n', environ=ENV)

    assert config.api_for(config.shops["berlin"]) == "v1"


def test_missing_manager_table_is_an_error_naming_it() -> None:
    assert "manager" in config_error("")


# --- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("bogus = 1\n" + MANAGER, "bogus"),
        (MANAGER + "[bogus]\nx = 1\n", "bogus"),
        (MANAGER + "[server]\nbogus = 1\n", "server.bogus"),
        (MANAGER + "bogus = 1\n", "manager.bogus"),
        (MANAGER + SHOP + "extra = 1\n", "shops.berlin.extra"),
        (MANAGER + SHOP + PARTNER + "foo = 1\n", "partners.drx.foo"),
        (MANAGER + "[pdf]\nbogus = 1\n", "pdf.bogus"),
        (MANAGER + "[idempotency]\nbogus = 1\n", "idempotency.bogus"),
        (MANAGER + "[state]\nbogus = 1\n", "state.bogus"),
        (MANAGER + "[logging]\nbogus = 1\n", "logging.bogus"),
    ],
)
def test_unknown_key_is_an_error_naming_its_dotted_path(text: str, path: str) -> None:
    message = config_error(text)

    assert f"{path}: unknown key" in message


def test_error_message_names_the_origin_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(MANAGER + "[server]\nbogus = 1\n")

    with pytest.raises(ConfigError, match="server.bogus") as caught:
        load_config(path, environ={})
    assert str(path) in str(caught.value)


# --- secrets ------------------------------------------------------------------------------------


def test_manager_key_written_inline_is_refused_without_echoing_it() -> None:
    message = config_error(MANAGER + SHOP.replace("manager_key_env", "manager_key"))

    assert "shops.berlin" in message
    assert "manager_key_env" in message
    assert "ORG1_MANAGER_KEY" not in message


def test_manager_key_comes_from_the_named_environment_variable() -> None:
    config = parse_config(MANAGER + SHOP, environ={"ORG1_MANAGER_KEY": "  org1-secret\n"})

    key = config.shops["berlin"].manager_key
    assert key is not None
    assert key.get_secret_value() == "org1-secret"
    assert "org1-secret" not in repr(config)


@pytest.mark.parametrize("environ", [{}, {"ORG1_MANAGER_KEY": ""}, {"ORG1_MANAGER_KEY": "  \n"}])
def test_missing_or_empty_env_var_names_the_key_and_the_variable(
    environ: dict[str, str],
) -> None:
    message = config_error(MANAGER + SHOP, environ)

    assert "shops.berlin.manager_key_env" in message
    assert "ORG1_MANAGER_KEY" in message


def test_manager_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "org1"
    secret.write_text("  file-secret\n\n")
    text = MANAGER + shop_with_key_file(secret)

    config = parse_config(text, environ={})

    key = config.shops["berlin"].manager_key
    assert key is not None and key.get_secret_value() == "file-secret"


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read"), ("", "is empty"), (" \n\t\n", "is empty")],
    ids=["missing", "empty", "blank"],
)
def test_unreadable_or_empty_key_file_names_the_key_and_file(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    secret = tmp_path / "org1"
    if content is not None:
        secret.write_text(content)
    text = MANAGER + shop_with_key_file(secret)

    message = config_error(text, {})

    assert "shops.berlin.manager_key_file" in message
    assert str(secret) in message
    assert expected in message


def test_key_file_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    text = MANAGER + shop_with_key_file(tmp_path)

    assert "shops.berlin.manager_key_file" in config_error(text, {})


def test_both_key_env_and_key_file_is_an_error() -> None:
    message = config_error(MANAGER + SHOP + 'manager_key_file = "/run/secrets/org1"\n')

    assert "shops.berlin" in message and "not both" in message


# --- partners -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_sha256",
    ["a" * 63, "a" * 65, "g" * 64, "", "0x" + "a" * 62, "a" * 32 + " " + "a" * 31],
    ids=["short", "long", "not-hex", "empty", "0x-prefix", "inner-space"],
)
def test_bad_key_sha256_is_an_error_naming_it(key_sha256: str) -> None:
    text = MANAGER + SHOP + f'[partners.drx]\nshop = "berlin"\nkey_sha256 = "{key_sha256}"\n'

    assert "partners.drx.key_sha256" in config_error(text)


def test_uppercase_key_sha256_is_normalised_to_lowercase() -> None:
    upper = hashlib.sha256(b"k").hexdigest().upper()
    text = MANAGER + SHOP + f'[partners.drx]\nshop = "berlin"\nkey_sha256 = " {upper} "\n'

    config = parse_config(text, environ=ENV)

    assert config.partners["drx"].key_sha256 == upper.lower()


def test_partner_naming_an_unknown_shop_is_an_error() -> None:
    text = MANAGER + SHOP + f'[partners.drx]\nshop = "hamburg"\nkey_sha256 = "{HASH_A}"\n'

    message = config_error(text)

    assert "partners.drx.shop" in message and "hamburg" in message


def test_partner_naming_an_unknown_profile_is_an_error() -> None:
    message = config_error(MANAGER + SHOP + PARTNER + 'profile = "nope"\n')

    assert "partners.drx.profile" in message and "nope" in message


def test_partner_with_known_profile_is_accepted() -> None:
    text = MANAGER + SHOP + PARTNER + 'profile = "drx"\n[profiles.drx]\nsource = "\'drx\'"\n'

    assert parse_config(text, environ=ENV).partners["drx"].profile == "drx"


def test_two_partners_with_the_same_key_hash_is_an_error_naming_both() -> None:
    text = (
        MANAGER
        + SHOP
        + PARTNER
        + f'[partners.other]\nshop = "berlin"\nkey_sha256 = "{HASH_A.upper()}"\n'
    )

    message = config_error(text)

    assert "partners.other.key_sha256" in message and "partners.drx" in message


def test_two_partners_with_different_keys_are_accepted() -> None:
    other = f'[partners.other]\nshop = "berlin"\nkey_sha256 = "{HASH_B}"\n'
    text = MANAGER + SHOP + PARTNER + other

    assert set(parse_config(text, environ=ENV).partners) == {"drx", "other"}


@pytest.mark.parametrize(("field", "value"), [("pdf", '"email"'), ("rate_per_min", "0")])
def test_bad_partner_value_names_the_key(field: str, value: str) -> None:
    message = config_error(MANAGER + SHOP + PARTNER + f"{field} = {value}\n")

    assert f"partners.drx.{field}" in message


# --- shops --------------------------------------------------------------------------------------


def test_accept_org_keys_without_hosts_is_an_error() -> None:
    message = config_error(MANAGER + SHOP + "accept_org_keys = true\n")

    assert "shops.berlin" in message and "hosts" in message


def test_accept_org_keys_with_hosts_is_accepted_and_hosts_are_lowercased() -> None:
    text = MANAGER + SHOP + 'accept_org_keys = true\nhosts = [" Shop1.Example.ORG "]\n'

    shop = parse_config(text, environ=ENV).shops["berlin"]

    assert shop.accept_org_keys is True
    assert shop.hosts == ("shop1.example.org",)


def test_shop_used_by_partners_without_a_key_is_an_error() -> None:
    shop = '[shops.berlin]\norg_id = "org1"\nshop_id = "shop1"\n'

    message = config_error(MANAGER + shop + PARTNER)

    assert "shops.berlin" in message and "manager_key_env" in message


def test_shop_used_by_no_partner_needs_no_key() -> None:
    shop = '[shops.berlin]\norg_id = "org1"\nshop_id = "shop1"\n'

    config = parse_config(MANAGER + shop, environ={})

    assert config.shops["berlin"].manager_key is None


@pytest.mark.parametrize(("field", "value"), [("org_id", '"org1"'), ("shop_id", '"shop1"')])
def test_empty_org_or_shop_id_is_an_error(field: str, value: str) -> None:
    assert f"shops.berlin.{field}" in config_error(MANAGER + SHOP.replace(value, '""'))


@pytest.mark.parametrize("name", ["bad name", "-dash-first", "x" * 65])
def test_shop_name_with_unsafe_characters_is_an_error(name: str) -> None:
    text = MANAGER + f'[shops."{name}"]\norg_id = "o"\nshop_id = "s"\n'

    assert "names use letters" in config_error(text, {})


# --- manager ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "https://manager.example/api",
        "https://manager.example/api/",
        "https://manager.example?x=1",
        "https://manager.example#x",
        "ftp://manager.example",
        "manager.example",
        "",
    ],
)
def test_base_url_that_is_not_scheme_and_host_is_refused(base_url: str) -> None:
    message = config_error(f'[manager]\nbase_url = "{base_url}"\n')

    assert "manager.base_url" in message


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("https://manager.example/", "https://manager.example"),
        ("https://manager.example", "https://manager.example"),
        ("http://127.0.0.1:8090/", "http://127.0.0.1:8090"),
    ],
)
def test_base_url_trailing_slash_is_stripped(base_url: str, expected: str) -> None:
    config = parse_config(f'[manager]\nbase_url = "{base_url}"\n', environ={})

    assert config.manager.base_url == expected


@pytest.mark.parametrize(
    ("line", "path"),
    [
        ('api = "v3"', "manager.api"),
        ("retries = -1", "manager.retries"),
        ("retries = 11", "manager.retries"),
        ("timeout_s = 0", "manager.timeout_s"),
    ],
)
def test_out_of_range_manager_value_names_the_key(line: str, path: str) -> None:
    assert path in config_error(MANAGER + line + "\n")


# --- pdf ----------------------------------------------------------------------------------------


def test_allow_networks_are_parsed_as_networks() -> None:
    text = MANAGER + '[pdf]\nallow_networks = ["10.20.0.0/16", "192.168.1.7/24", "fd00::/8"]\n'

    networks = parse_config(text, environ={}).pdf.allow_networks

    assert networks == (
        ipaddress.ip_network("10.20.0.0/16"),
        ipaddress.ip_network("192.168.1.0/24"),  # host bits are tolerated, not an error
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize("cidr", ["nope", "10.0.0.0/33", "300.1.1.1/8"])
def test_bad_cidr_in_allow_networks_is_an_error(cidr: str) -> None:
    message = config_error(MANAGER + f'[pdf]\nallow_networks = ["{cidr}"]\n')

    assert "pdf.allow_networks" in message and "CIDR" in message


def test_allow_hosts_are_lowercased_without_trailing_dot() -> None:
    text = MANAGER + '[pdf]\nallow_hosts = ["Docs.Example.ORG.", " cdn.example "]\n'

    assert parse_config(text, environ={}).pdf.allow_hosts == ("docs.example.org", "cdn.example")


# --- profiles -----------------------------------------------------------------------------------


def test_profile_table_is_split_into_fields_and_keep_unmapped() -> None:
    text = MANAGER + (
        "[profiles.drx]\n"
        'external_reference = "order_no"\n'
        'customer_email = "patient.email"\n'
        "keep_unmapped = true\n"
        "[profiles.plain]\n"
        'customer_name = "name"\n'
    )

    profiles = parse_config(text, environ={}).profiles

    assert profiles["drx"].fields == {
        "external_reference": "order_no",
        "customer_email": "patient.email",
    }
    assert profiles["drx"].keep_unmapped is True
    assert profiles["plain"].fields == {"customer_name": "name"}
    assert profiles["plain"].keep_unmapped is False


@pytest.mark.parametrize("value", ["5", "true", '["a"]', "{ a = 1 }"])
def test_profile_expression_that_is_not_a_string_is_refused(value: str) -> None:
    message = config_error(MANAGER + f"[profiles.drx]\ncustomer_name = {value}\n")

    assert "profiles.drx" in message and "customer_name" in message


# --- state --------------------------------------------------------------------------------------


def test_memory_backend_needs_no_redis_url() -> None:
    assert parse_config(MANAGER, environ={}).state.redis_url is None


@pytest.mark.parametrize(
    ("line", "variable"), [("", "REDIS_URL"), ('redis_url_env = "STATE_URL"', "STATE_URL")]
)
def test_redis_backend_reads_its_url_from_the_named_variable(line: str, variable: str) -> None:
    text = MANAGER + f'[state]\nbackend = "redis"\n{line}\n'

    config = parse_config(text, environ={variable: " redis://:pw@redis:6379/0 "})

    assert config.state.redis_url is not None
    assert config.state.redis_url.get_secret_value() == "redis://:pw@redis:6379/0"
    assert "pw@redis" not in repr(config)


@pytest.mark.parametrize("environ", [{}, {"REDIS_URL": ""}, {"REDIS_URL": "  "}])
def test_redis_backend_without_its_url_names_the_key_and_the_variable(
    environ: dict[str, str],
) -> None:
    message = config_error(MANAGER + '[state]\nbackend = "redis"\n', environ)

    assert "state.redis_url_env" in message and "REDIS_URL" in message


@pytest.mark.parametrize("url", ["http://:pw@redis:6379", "redis-host:6379", "pw@redis"])
def test_redis_url_with_another_scheme_is_refused_without_echoing_it(url: str) -> None:
    message = config_error(MANAGER + '[state]\nbackend = "redis"\n', {"REDIS_URL": url})

    assert "state.redis_url_env" in message
    assert "pw" not in message and "redis-host" not in message


def test_redis_url_written_inline_is_refused() -> None:
    text = MANAGER + '[state]\nbackend = "redis"\nredis_url = "redis://:pw@redis"\n'

    message = config_error(text, {"REDIS_URL": "redis://redis"})

    assert "state" in message and "redis_url_env" in message
    assert ":pw@" not in message


def test_redis_url_file_is_read_instead_of_the_variable(tmp_path: Path) -> None:
    secret = tmp_path / "redis-url"
    secret.write_text("rediss://:pw@redis:6380/0\n", encoding="utf-8")
    text = MANAGER + f'[state]\nbackend = "redis"\nredis_url_file = "{secret}"\n'

    config = parse_config(text, environ={})

    assert config.state.redis_url is not None
    assert config.state.redis_url.get_secret_value() == "rediss://:pw@redis:6380/0"


def test_redis_url_file_with_another_scheme_names_the_file_not_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "redis-url"
    secret.write_text("http://:pw@redis", encoding="utf-8")
    text = MANAGER + f'[state]\nbackend = "redis"\nredis_url_file = "{secret}"\n'

    message = config_error(text, {})

    assert "state.redis_url_file" in message and str(secret) in message
    assert ":pw@" not in message


def test_redis_url_env_and_file_together_are_refused() -> None:
    text = MANAGER + '[state]\nredis_url_env = "R"\nredis_url_file = "/run/secrets/r"\n'

    assert "redis_url_env or redis_url_file" in config_error(text, {})


def test_share_tokens_without_redis_is_refused() -> None:
    message = config_error(MANAGER + "[state]\nshare_tokens = true\n")

    assert "state" in message and "share_tokens" in message


def test_shared_tokens_with_the_outbox_in_redis_are_refused() -> None:
    text = (
        MANAGER
        + '[state]\nbackend = "redis"\nshare_tokens = true\n'
        + '[outbox]\nenabled = true\nkey_env = "K"\n'
    )
    environ = {**ENV, "REDIS_URL": "redis://127.0.0.1:6379/0", "K": new_key()}

    message = config_error(text, environ)

    assert "state.share_tokens" in message and "disk" in message


@pytest.mark.parametrize(
    ("section", "line"), [("state", 'backend = "etcd"'), ("logging", 'format = "xml"')]
)
def test_unknown_choice_is_an_error_naming_the_key(section: str, line: str) -> None:
    key = line.split(" ", 1)[0]

    assert f"{section}.{key}" in config_error(MANAGER + f"[{section}]\n{line}\n")


# --- the file: digest, TOML errors, loading -----------------------------------------------------


def test_digest_is_the_sha256_of_the_file_and_changes_with_it(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(MANAGER)
    first = load_config(path, environ={})
    again = load_config(path, environ={})
    path.write_text(MANAGER + "[server]\nport = 8081\n")
    changed = load_config(path, environ={})

    assert first.digest == hashlib.sha256(MANAGER.encode()).hexdigest()
    assert again.digest == first.digest
    assert changed.digest != first.digest
    assert changed.server.port == 8081


def test_bytes_and_text_give_the_same_digest() -> None:
    assert (
        parse_config(MANAGER.encode(), environ={}).digest
        == parse_config(MANAGER, environ={}).digest
    )


@pytest.mark.parametrize(
    "raw",
    [b"[manager\nbase_url = 1", b'[manager]\nbase_url = "x"\nbase_url = "y"\n', b"\xff\xfe[x]"],
    ids=["broken-table", "duplicate-key", "not-utf8"],
)
def test_invalid_toml_is_a_config_error(raw: bytes) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config(raw, environ={}, origin="gw.toml")


def test_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError, match="cannot read configuration file") as caught:
        load_config(path, environ={})
    assert str(path) in str(caught.value)


def test_load_config_reads_secrets_from_the_given_environ(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(MANAGER + SHOP + PARTNER)

    config = load_config(path, environ={"ORG1_MANAGER_KEY": "from-environ"})

    key = config.shops["berlin"].manager_key
    assert key is not None and key.get_secret_value() == "from-environ"


@pytest.mark.parametrize(
    ("arg", "environ", "expected"),
    [
        ("cli.toml", {"GATEWAY_CONFIG": "env.toml"}, "cli.toml"),
        (None, {"GATEWAY_CONFIG": "env.toml"}, "env.toml"),
        (None, {"GATEWAY_CONFIG": ""}, "config/gateway.toml"),
        (None, {}, "config/gateway.toml"),
        ("", {}, "config/gateway.toml"),
    ],
)
def test_resolve_config_path_prefers_argument_then_env_then_default(
    arg: str | None, environ: dict[str, str], expected: str
) -> None:
    assert resolve_config_path(arg, environ) == Path(expected)


# --- the operator's documented files ------------------------------------------------------------


def test_example_config_loads_with_the_variable_it_names() -> None:
    config = load_config(REPO / "config" / "example.toml", environ={"ORG1_MANAGER_KEY": "k"})

    assert set(config.shops) == {"berlin"}
    assert config.partners["drx"].shop == "berlin"
    assert config.partners["drx"].profile == "drx"
    assert config.shops["berlin"].hosts == ("shop1.example.org",)


def test_example_config_without_its_variable_names_it() -> None:
    with pytest.raises(ConfigError, match="ORG1_MANAGER_KEY"):
        load_config(REPO / "config" / "example.toml", environ={})


def test_demo_config_loads_and_its_documented_keys_match_the_hashes() -> None:
    environ = {"DEMO_ORG_KEY": "demo", "OUTBOX_KEY": new_key()}
    config = load_config(REPO / "config" / "demo.toml", environ=environ)

    # demo.toml's header documents the partners' keys; `make demo` prints curl lines with them.
    hashes = {name: partner.key_sha256 for name, partner in config.partners.items()}
    assert hashes == {
        "telemed-one": hashlib.sha256(b"demo-partner-key").hexdigest(),
        "drx": hashlib.sha256(b"demo-drx-key").hexdigest(),
    }
    assert config.manager.base_url == "http://127.0.0.1:8090"
    assert ipaddress.ip_network("127.0.0.0/8") in config.pdf.allow_networks
    assert config.outbox.enabled and len(config.outbox.keys) == 1  # the demo shows the outbox


# --- manager proxy ------------------------------------------------------------------------------


def test_no_proxy_by_default_even_with_proxy_variables_in_the_environment() -> None:
    config = parse_config(MANAGER, environ={"HTTPS_PROXY": "http://proxy:3128"})

    assert config.manager.proxy is None and config.manager.trust_env is False


def test_proxy_url_from_the_file_is_used() -> None:
    config = parse_config(MANAGER + 'proxy_url = "http://proxy.corp:3128"\n', environ={})

    assert config.manager.proxy is not None
    assert config.manager.proxy.get_secret_value() == "http://proxy.corp:3128"


def test_proxy_url_with_credentials_in_the_file_is_refused_without_echoing_them() -> None:
    message = config_error(MANAGER + 'proxy_url = "http://gw:hunter2@proxy.corp:3128"\n')

    assert "manager.proxy_url" in message and "proxy_url_env" in message
    assert "hunter2" not in message and "proxy.corp" not in message


def test_proxy_url_env_may_carry_credentials_and_stays_secret() -> None:
    url = "http://gw:hunter2@proxy.corp:3128"

    config = parse_config(MANAGER + 'proxy_url_env = "P"\n', environ={"P": f" {url} "})

    assert config.manager.proxy is not None and config.manager.proxy.get_secret_value() == url
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())


def test_proxy_url_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "proxy"
    secret.write_text("https://gw:pw@proxy.corp\n", encoding="utf-8")

    config = parse_config(MANAGER + f'proxy_url_file = "{secret}"\n', environ={})

    assert config.manager.proxy is not None
    assert config.manager.proxy.get_secret_value() == "https://gw:pw@proxy.corp"


@pytest.mark.parametrize(
    ("line", "environ", "names"),
    [
        ('proxy_url_env = "P"', {}, ["manager.proxy_url_env", "P"]),
        ('proxy_url_env = "P"', {"P": "ftp://gw:hunter2@corp"}, ["manager.proxy_url_env"]),
        ('proxy_url_file = "/nonexistent/proxy"', {}, ["manager.proxy_url_file"]),
        ("trust_env = true", {"HTTPS_PROXY": "gw:hunter2@corp:1"}, ["trust_env", "HTTPS_PROXY"]),
    ],
)
def test_unusable_proxy_secret_names_the_key_and_never_the_value(
    line: str, environ: dict[str, str], names: list[str]
) -> None:
    message = config_error(MANAGER + line + "\n", environ)

    assert all(name in message for name in names), message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HTTPS_PROXY": "http://gw:pw@proxy.corp:3128"}, "http://gw:pw@proxy.corp:3128"),
        ({"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:1"}, "http://a:1"),
        ({"HTTP_PROXY": "http://proxy.corp:3128"}, None),  # Manager is https
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": ".example"}, None),
        ({}, None),
    ],
)
def test_trust_env_reads_the_proxy_for_managers_scheme_and_honours_no_proxy(
    environ: dict[str, str], expected: str | None
) -> None:
    config = parse_config(MANAGER + "trust_env = true\n", environ=environ)

    proxy = config.manager.proxy
    assert (proxy.get_secret_value() if proxy else None) == expected


@pytest.mark.parametrize(
    "lines",
    [
        'proxy_url = "http://p:1"\ntrust_env = true',
        'proxy_url = "http://p:1"\nproxy_url_env = "P"',
        'proxy_url_env = "P"\nproxy_url_file = "/run/secrets/p"',
    ],
)
def test_more_than_one_proxy_source_is_refused(lines: str) -> None:
    message = config_error(MANAGER + lines + "\n", {"P": "http://p:1"})

    assert "manager" in message and "not several" in message


def test_resolved_proxy_written_inline_is_refused() -> None:
    message = config_error(MANAGER + 'proxy = "http://gw:hunter2@p:1"\n')

    assert "proxy_url_env" in message and "hunter2" not in message


# --- the console's operator token ---------------------------------------------------------------

ADMIN_TOKEN = "console-token-0123456789"


def test_no_admin_token_by_default_means_a_read_only_console() -> None:
    assert parse_config(MANAGER, environ=ENV).server.admin_token is None


def test_admin_token_comes_from_the_named_env_var_or_file(tmp_path: Path) -> None:
    text = MANAGER + '[server]\nadmin_token_env = "ADMIN"\n'
    config = parse_config(text, environ={**ENV, "ADMIN": f" {ADMIN_TOKEN}\n"})
    assert config.server.admin_token is not None
    assert config.server.admin_token.get_secret_value() == ADMIN_TOKEN
    assert ADMIN_TOKEN not in repr(config) and ADMIN_TOKEN not in config.model_dump_json()
    secret = tmp_path / "admin"
    secret.write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
    config = parse_config(MANAGER + f'[server]\nadmin_token_file = "{secret}"\n', environ=ENV)
    assert config.server.admin_token is not None
    assert config.server.admin_token.get_secret_value() == ADMIN_TOKEN


@pytest.mark.parametrize(
    ("server", "environ", "expected"),
    [
        ('admin_token_env = "ADMIN"', {}, "server.admin_token_env: environment variable ADMIN"),
        ('admin_token_env = "ADMIN"', {"ADMIN": "short"}, "at least 16 characters"),
        ('admin_token_file = "/nonexistent/admin"', {}, "server.admin_token_file: cannot read"),
        ('admin_token_env = "A"\nadmin_token_file = "/f"', {}, "not both"),
        (f'admin_token = "{ADMIN_TOKEN}"', {}, "secrets never live in the file"),
    ],
)
def test_a_bad_admin_token_setting_names_the_key(
    server: str, environ: dict[str, str], expected: str
) -> None:
    message = config_error(MANAGER + f"[server]\n{server}\n", {**ENV, **environ})
    assert expected in message
    assert ADMIN_TOKEN not in message
