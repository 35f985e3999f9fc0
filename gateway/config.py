"""The operator's TOML file as typed, validated models; the only module that reads files or the env.

``load_config(path)`` is the one loading path: TOML (stdlib) → pydantic models (unknown keys are
errors naming their path) → cross-checks → secrets resolved from ``*_env`` / ``*_file``.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.upstream_proxy import ProxyUrlError, parse_proxy_url, select_env_proxy

DEFAULT_CONFIG_PATH: Final = "config/gateway.toml"
CONFIG_ENV: Final = "GATEWAY_CONFIG"
_SHA256_HEX: Final = re.compile(r"^[0-9a-f]{64}$")
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A console token shorter than this is refused: it guards the Retry and Drop buttons.
MIN_ADMIN_TOKEN_CHARS: Final = 16

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def refuse_resolved_key(data: Any, key: str, message: str) -> Any:
    """A field that load_config fills from a secret (``key``) must not come from the file."""
    if isinstance(data, dict) and key in data:
        raise ValueError(message)
    return data


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    admin_port: int = Field(default=9091, ge=0, le=65535)
    max_body_mb: PositiveFloat = 20
    # Seconds between SIGTERM and closing the listener, with /readyz already 503, so that a load
    # balancer stops routing here before connections are refused.
    drain_s: float = Field(default=0, ge=0, le=300)
    # How long requests in flight may take to finish after the listener is closed.
    shutdown_timeout_s: float = Field(default=30, gt=0, le=600)
    # How long a client may take to send a request's headers (from when the connection opens or
    # its previous answer was sent) and, separately, its body: a stuck or trickling client cannot
    # hold a connection longer. Also how long an idle keep-alive connection is kept.
    read_timeout_s: float = Field(default=30, gt=0, le=3600)

    # The operator console's token (contract section 12): without one the console is read-only.
    admin_token_env: str | None = None
    admin_token_file: str | None = None
    # Filled by load_config from admin_token_env / admin_token_file; never read from the file.
    admin_token: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "admin_token" in data:
            raise ValueError(
                "secrets never live in the file: use admin_token_env or admin_token_file"
            )
        return data

    @model_validator(mode="after")
    def _one_token_source(self) -> ServerConfig:
        if self.admin_token_env and self.admin_token_file:
            raise ValueError("set admin_token_env or admin_token_file, not both")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class ManagerConfig(_Section):
    base_url: str
    api: Literal["v1", "v2"] = "v2"
    timeout_s: PositiveFloat = 15
    retries: int = Field(default=3, ge=0, le=10)
    # Size of the keep-alive connection pool towards Manager (per gateway process).
    pool_size: int = Field(default=100, ge=1, le=1000)
    # An outbound proxy for Manager calls (never for PDF fetches): at most one of these four.
    proxy_url: str | None = None  # no credentials: those are a secret (proxy_url_env / _file)
    proxy_url_env: str | None = None
    proxy_url_file: str | None = None
    trust_env: bool = False  # the environment's HTTPS_PROXY / HTTP_PROXY / NO_PROXY
    # Filled by load_config from the four above; never read from the file, never logged.
    proxy: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_proxy(cls, data: Any) -> Any:
        message = "unknown key proxy: use proxy_url, proxy_url_env or proxy_url_file"
        return refuse_resolved_key(data, "proxy", message)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+$", value.rstrip("/")):
            raise ValueError("must be an http(s) URL with no path, e.g. https://manager.example")
        return value.rstrip("/")

    @field_validator("proxy_url")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        return None if value is None else parse_proxy_url(value, allow_credentials=False)

    @model_validator(mode="after")
    def _one_proxy_source(self) -> ManagerConfig:
        chosen = [
            name
            for name in ("proxy_url", "proxy_url_env", "proxy_url_file", "trust_env")
            if getattr(self, name)
        ]
        if len(chosen) > 1:
            raise ValueError(f"set one of {', '.join(chosen)}, not several")
        return self


class ShopConfig(_Section):
    org_id: str = Field(min_length=1)
    shop_id: str = Field(min_length=1)
    hosts: tuple[str, ...] = ()
    manager_key_env: str | None = None
    manager_key_file: str | None = None
    accept_org_keys: bool = False
    api: Literal["v1", "v2"] | None = None
    # The signing secret of the org's webhook subscription in Manager (section 11).
    webhook_secret_env: str | None = None
    webhook_secret_file: str | None = None
    # Filled by load_config from manager_key_env / manager_key_file; never read from the file.
    manager_key: SecretStr | None = Field(default=None, exclude=True)
    # Filled by load_config from webhook_secret_env / webhook_secret_file.
    webhook_secret: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        message = "secrets never live in the file: use manager_key_env or manager_key_file"
        refuse_resolved_key(data, "manager_key", message)
        message = "secrets never live in the file: use webhook_secret_env or webhook_secret_file"
        return refuse_resolved_key(data, "webhook_secret", message)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in value)

    @model_validator(mode="after")
    def _checks(self) -> ShopConfig:
        if self.manager_key_env and self.manager_key_file:
            raise ValueError("set manager_key_env or manager_key_file, not both")
        if self.webhook_secret_env and self.webhook_secret_file:
            raise ValueError("set webhook_secret_env or webhook_secret_file, not both")
        if self.accept_org_keys and not self.hosts:
            raise ValueError("accept_org_keys = true needs hosts")
        return self


class PartnerConfig(_Section):
    shop: str
    key_sha256: str
    source: str | None = None
    profile: str | None = None
    pdf: Literal["fetch", "forward"] = "fetch"
    rate_per_min: int | None = Field(default=None, ge=1)
    require_reference: bool = False
    # Where the partner hears what became of its orders (section 11), and the whsec_ secret.
    callback_url: str | None = None
    callback_secret_env: str | None = None
    callback_secret_file: str | None = None
    # Filled by load_config from callback_secret_env / callback_secret_file.
    callback_secret: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        message = "secrets never live in the file: use callback_secret_env or callback_secret_file"
        return refuse_resolved_key(data, "callback_secret", message)

    @model_validator(mode="after")
    def _callback(self) -> PartnerConfig:
        if self.callback_secret_env and self.callback_secret_file:
            raise ValueError("set callback_secret_env or callback_secret_file, not both")
        if self.callback_url is not None and not (
            self.callback_secret_env or self.callback_secret_file
        ):
            raise ValueError(
                "callback_url needs callback_secret_env or callback_secret_file "
                "(see `gateway new-secret webhook`)"
            )
        return self

    @field_validator("key_sha256")
    @classmethod
    def _hash(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA256_HEX.match(value):
            raise ValueError("must be 64 hex characters (see `gateway hash-key`)")
        return value


class ProfileConfig(_Section):
    """A partner profile: target field → JMESPath expression over the partner's body."""

    fields: dict[str, str]
    keep_unmapped: bool = False

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "fields" in data:
            return data
        fields = {k: v for k, v in data.items() if k != "keep_unmapped"}
        for name, expression in fields.items():
            if not isinstance(expression, str):
                raise ValueError(f"{name}: must be a JMESPath expression (a string)")
        return {"fields": fields, "keep_unmapped": data.get("keep_unmapped", False)}


def _parse_networks(value: Any) -> Any:
    if isinstance(value, list | tuple):
        try:
            return tuple(ipaddress.ip_network(v, strict=False) for v in value)
        except ValueError as exc:
            raise ValueError(f"not a CIDR network: {exc}") from None
    return value


class PdfConfig(_Section):
    max_mb: PositiveFloat = 10
    timeout_s: PositiveFloat = 10
    allow_http: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    # Ports other than the scheme's default (443, or 80 with allow_http) that may be fetched.
    allow_ports: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = ()

    @field_validator("allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        return _parse_networks(value)

    @field_validator("allow_hosts")
    @classmethod
    def _allow_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.strip().lower().rstrip(".") for h in value)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)


class IdempotencyConfig(_Section):
    ttl_hours: PositiveFloat = 24
    # Upper bound on remembered references per process (memory backend).
    max_entries: int = Field(default=100_000, ge=100)


class StateConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    redis_url_env: str = "REDIS_URL"
    redis_url_file: str | None = None  # instead of redis_url_env: a mounted secret file
    share_tokens: bool = False
    # Filled by load_config from redis_url_env or redis_url_file (the URL may hold a password).
    redis_url: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_url(cls, data: Any) -> Any:
        message = "the Redis URL may hold a password: name it with redis_url_env"
        return refuse_resolved_key(data, "redis_url", message)

    @model_validator(mode="after")
    def _tokens_need_redis(self) -> StateConfig:
        if self.redis_url_file and "redis_url_env" in self.model_fields_set:
            raise ValueError("set redis_url_env or redis_url_file, not both")
        if self.share_tokens and self.backend != "redis":
            raise ValueError('share_tokens = true needs backend = "redis"')
        return self


class OutboxConfig(_Section):
    """Store and forward (contract section 9): orders kept encrypted until Manager takes them."""

    enabled: bool = False
    path: str = "/var/lib/telemed-gateway/outbox.db"
    key_env: str | None = None
    key_file: str | None = None
    max_age_hours: PositiveFloat = 72
    retry_min_s: PositiveFloat = 5
    retry_max_s: PositiveFloat = 600
    ledger_days: PositiveFloat = 30
    # Filled by load_config from key_env / key_file: Fernet keys, the first one encrypts.
    keys: tuple[SecretStr, ...] = Field(default=(), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("key" in data or "keys" in data):
            raise ValueError("secrets never live in the file: use key_env or key_file")
        return data

    @model_validator(mode="after")
    def _checks(self) -> OutboxConfig:
        if self.key_env and self.key_file:
            raise ValueError("set key_env or key_file, not both")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be at least retry_min_s")
        return self

    @property
    def max_age_s(self) -> float:
        return self.max_age_hours * 3600

    @property
    def ledger_s(self) -> float:
        return self.ledger_days * 86400


class WebhooksConfig(_Section):
    """Manager's webhooks in, partner callbacks out (contract section 11); needs the outbox."""

    enabled: bool = False
    dedupe_hours: PositiveFloat = 72
    callback_timeout_s: PositiveFloat = 10
    callback_allow_http: bool = False
    callback_allow_networks: tuple[IPNetwork, ...] = ()
    callback_allow_ports: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = ()

    @field_validator("callback_allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        return _parse_networks(value)

    @property
    def dedupe_s(self) -> float:
        return self.dedupe_hours * 3600


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class Config(_Section):
    """The whole file. Build it with :func:`load_config` (or :func:`parse_config` in tests)."""

    server: ServerConfig = ServerConfig()
    manager: ManagerConfig
    shops: dict[str, ShopConfig] = {}
    partners: dict[str, PartnerConfig] = {}
    profiles: dict[str, ProfileConfig] = {}
    pdf: PdfConfig = PdfConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    state: StateConfig = StateConfig()
    outbox: OutboxConfig = OutboxConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    logging: LoggingConfig = LoggingConfig()
    # sha256 of the file's bytes: which configuration is active (logs, metrics, reload).
    digest: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Config:
        for kind, names in (("shops", self.shops), ("partners", self.partners)):
            for name in names:
                if not _NAME.match(name):
                    raise ValueError(f"{kind}.{name}: names use letters, digits, '_', '-', '.'")
        seen: dict[str, str] = {}
        for name, partner in self.partners.items():
            if partner.shop not in self.shops:
                raise ValueError(f"partners.{name}.shop: no [shops.{partner.shop}] table")
            if partner.profile is not None and partner.profile not in self.profiles:
                raise ValueError(f"partners.{name}.profile: no [profiles.{partner.profile}] table")
            if partner.key_sha256 in seen:
                raise ValueError(
                    f"partners.{name}.key_sha256: same key as partners.{seen[partner.key_sha256]}"
                )
            seen[partner.key_sha256] = name
        if self.outbox.enabled and self.state.share_tokens:
            # The outbox in Redis needs Redis to persist (AOF); Manager's tokens must not reach
            # a disk (Manager's documentation: keep tokens in memory only).
            raise ValueError(
                "state.share_tokens: with the outbox on, Redis persists what it holds, and "
                "Manager's tokens must not reach a disk; set share_tokens = false"
            )
        used = {p.shop for p in self.partners.values()}
        for name, shop in self.shops.items():
            if name in used and not (shop.manager_key_env or shop.manager_key_file):
                raise ValueError(
                    f"shops.{name}: partners use this shop, so it needs manager_key_env "
                    "or manager_key_file"
                )
        return self

    @model_validator(mode="after")
    def _webhooks_need_the_outbox(self) -> Config:
        if self.webhooks.enabled and not self.outbox.enabled:
            raise ValueError("webhooks.enabled: webhooks need the outbox ([outbox] enabled = true)")
        for name, partner in self.partners.items():
            if partner.callback_url is not None and not self.outbox.enabled:
                raise ValueError(
                    f"partners.{name}.callback_url: callbacks need the outbox "
                    "([outbox] enabled = true)"
                )
        return self

    @property
    def claim_lease_s(self) -> float:
        """Longest a request can hold an order reference: its PDF and upstream deadlines."""
        return self.pdf.timeout_s + self.manager.timeout_s + 30

    def api_for(self, shop: ShopConfig) -> Literal["v1", "v2"]:
        return shop.api or self.manager.api


def resolve_config_path(path: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--config PATH``, else ``$GATEWAY_CONFIG``, else ``config/gateway.toml``."""
    env = os.environ if environ is None else environ
    return Path(path or env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def read_env_secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret outside the file (the sandbox's webhook secret), or None if unset or empty."""
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve the secrets of the configuration file.

    Raises:
        ConfigError: one line naming the bad key, the missing variable or the unreadable file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    return parse_config(raw, environ=os.environ if environ is None else environ, origin=str(path))


def parse_config(
    raw: bytes | str, *, environ: Mapping[str, str], origin: str = "<config>"
) -> Config:
    """Validate TOML text (bytes or str) and resolve its secrets from ``environ`` / files."""
    data_bytes = raw.encode() if isinstance(raw, str) else raw
    try:
        data = tomllib.loads(data_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {describe_validation_error(exc)}") from None
    shops = {name: _with_secret(name, shop, environ) for name, shop in config.shops.items()}
    digest = hashlib.sha256(data_bytes).hexdigest()
    update: dict[str, object] = {"shops": shops, "digest": digest}
    if config.state.backend == "redis":
        update["state"] = _with_redis_url(config.state, environ)
    manager = _with_proxy(config.manager, environ)
    if manager is not config.manager:
        update["manager"] = manager
    update["outbox"] = _with_outbox_keys(config.outbox, environ)
    update["partners"] = {
        name: _with_callback_secret(name, partner, environ)
        for name, partner in config.partners.items()
    }
    update["server"] = _with_admin_token(config.server, environ)
    return config.model_copy(update=update)


def _with_admin_token(server: ServerConfig, environ: Mapping[str, str]) -> ServerConfig:
    """The console's token from ``admin_token_env`` / ``admin_token_file`` (None: read-only)."""
    token = read_secret(
        "server.admin_token", server.admin_token_env, server.admin_token_file, environ
    )
    if token is None:
        return server
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        suffix = "env" if server.admin_token_env else "file"
        raise ConfigError(
            f"server.admin_token_{suffix}: the console token must have at least "
            f"{MIN_ADMIN_TOKEN_CHARS} characters"
        )
    return server.model_copy(update={"admin_token": SecretStr(token)})


def _with_outbox_keys(outbox: OutboxConfig, environ: Mapping[str, str]) -> OutboxConfig:
    """The outbox's Fernet keys, checked now: an enabled outbox never starts without them."""
    if not outbox.enabled:
        return outbox
    value = read_secret("outbox.key", outbox.key_env, outbox.key_file, environ)
    if value is None:
        raise ConfigError("outbox.key_env: an enabled outbox needs key_env or key_file")
    name = "outbox.key_env" if outbox.key_env else "outbox.key_file"
    keys = tuple(part.strip() for part in value.split(",") if part.strip())
    for index, key in enumerate(keys):
        if not is_fernet_key(key):
            raise ConfigError(
                f"{name}: key {index + 1} is not a Fernet key (see `gateway new-secret outbox`)"
            )
    return outbox.model_copy(update={"keys": tuple(SecretStr(key) for key in keys)})


def is_fernet_key(key: str) -> bool:
    """Whether ``key`` is what Fernet takes: 32 bytes, url-safe base64."""
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32 and len(key) == 44
    except (ValueError, UnicodeEncodeError):
        return False


def read_secret(
    where: str, env_name: str | None, file_path: str | None, environ: Mapping[str, str]
) -> str | None:
    """The secret named by an ``*_env`` variable or an ``*_file`` path, stripped (None: neither).

    ``where`` is the dotted key without its suffix (``shops.berlin.manager_key``), for messages
    that name the key, the variable or the file, and never the value.

    Raises:
        ConfigError: the variable is unset or empty, the file unreadable or empty.
    """
    if env_name:
        value = environ.get(env_name, "")
        if not value.strip():
            raise ConfigError(f"{where}_env: environment variable {env_name} is not set or empty")
    elif file_path:
        try:
            value = Path(file_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}_file: cannot read {file_path}: {exc.strerror}") from None
        if not value.strip():
            raise ConfigError(f"{where}_file: {file_path} is empty")
    else:
        return None
    return value.strip()


def _with_secret(name: str, shop: ShopConfig, environ: Mapping[str, str]) -> ShopConfig:
    update: dict[str, SecretStr] = {}
    where = f"shops.{name}.manager_key"
    value = read_secret(where, shop.manager_key_env, shop.manager_key_file, environ)
    if value is not None:
        update["manager_key"] = SecretStr(value)
    where = f"shops.{name}.webhook_secret"
    value = read_secret(where, shop.webhook_secret_env, shop.webhook_secret_file, environ)
    if value is not None:
        update["webhook_secret"] = SecretStr(value)
    return shop.model_copy(update=update) if update else shop


def _with_callback_secret(
    name: str, partner: PartnerConfig, environ: Mapping[str, str]
) -> PartnerConfig:
    where = f"partners.{name}.callback_secret"
    env_name, file_path = partner.callback_secret_env, partner.callback_secret_file
    value = read_secret(where, env_name, file_path, environ)
    if value is None:
        return partner
    if parse_whsec(value) is None:
        raise ConfigError(
            f"{where}_{'env' if env_name else 'file'}: not a Standard Webhooks secret (whsec_ "
            "and base64; see `gateway new-secret webhook`)"
        )
    return partner.model_copy(update={"callback_secret": SecretStr(value)})


WHSEC_PREFIX: Final = "whsec_"
MIN_WHSEC_BYTES: Final = 24


def parse_whsec(secret: str) -> bytes | None:
    """The signing key of a ``whsec_…`` Standard Webhooks secret (base64 after the prefix), or
    None if the text is not one (or its key is shorter than 24 bytes)."""
    if not secret.startswith(WHSEC_PREFIX):
        return None
    encoded = secret[len(WHSEC_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    return key if len(key) >= MIN_WHSEC_BYTES else None


def _with_redis_url(state: StateConfig, environ: Mapping[str, str]) -> StateConfig:
    env_name = None if state.redis_url_file else state.redis_url_env
    url = read_secret("state.redis_url", env_name, state.redis_url_file, environ)
    assert url is not None  # one of the two is always set (redis_url_env has a default)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        source = state.redis_url_file or state.redis_url_env
        suffix = "file" if state.redis_url_file else "env"
        raise ConfigError(
            f"state.redis_url_{suffix}: {source} must be a redis://, rediss:// or unix:// URL"
        )
    return state.model_copy(update={"redis_url": SecretStr(url)})


def _with_proxy(manager: ManagerConfig, environ: Mapping[str, str]) -> ManagerConfig:
    """The proxy for Manager calls, resolved from the file, a secret, or the environment."""
    if manager.proxy_url is not None:
        return manager.model_copy(update={"proxy": SecretStr(manager.proxy_url)})
    if manager.trust_env:
        found = select_env_proxy(manager.base_url, environ)
        if found is None:
            return manager
        key, raw = f"trust_env: {found.variable}", found.url
    else:
        secret = (manager.proxy_url_env, manager.proxy_url_file)
        value = read_secret("manager.proxy_url", *secret, environ)
        if value is None:
            return manager
        suffix = "env" if manager.proxy_url_env else "file"
        key, raw = f"proxy_url_{suffix}: the proxy URL", value
    try:
        url = parse_proxy_url(raw, allow_credentials=True)
    except ProxyUrlError as exc:
        raise ConfigError(f"manager.{key} {exc}") from None
    return manager.model_copy(update={"proxy": SecretStr(url)})


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem as ``dotted.key.path: message`` (pydantic's input values left out)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(part) for part in first["loc"] if part != "fields")
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    message = message.removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{loc}: {message}{suffix}" if loc else f"{message}{suffix}"
