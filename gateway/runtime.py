"""A configuration compiled for serving: key registry, profiles, per-partner targets.

Built once per load (start-up or SIGHUP) and swapped as one object, so a request sees either the
old configuration or the new one, never a mix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.auth import Caller, KeyRegistry, ShopRef
from gateway.callbacks import CallbackTarget
from gateway.config import Config, parse_whsec
from gateway.egress import EgressRefusedError, callback_policy, check_url
from gateway.errors import ConfigError
from gateway.manager import UpstreamTarget
from gateway.normalize import Profile, Target, compile_profile


@dataclass(frozen=True, slots=True)
class Route:
    """Everything the order pipeline needs to know about one caller."""

    target: Target
    upstream: UpstreamTarget
    pdf: Literal["fetch", "forward"]
    rate_per_min: int | None = None


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    registry: KeyRegistry
    routes: Mapping[str, Route]  # by partner name
    callbacks: Mapping[str, CallbackTarget] = field(default_factory=dict)  # by partner name
    # (org_id, secret) of every shop with a Manager webhook subscription.
    webhook_secrets: tuple[tuple[str, bytes], ...] = ()
    # org_id → the partners whose orders go to it (a Manager event matches only those).
    partners_of_org: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def targets(self) -> Mapping[str, UpstreamTarget]:
        """Where each partner's orders go upstream (the outbox's deliverer sends by partner)."""
        return {name: route.upstream for name, route in self.routes.items()}

    def route_for(self, caller: Caller) -> Route:
        """The partner's route, or one built for an org-key caller (its own key upstream)."""
        if caller.org_key is None:
            return self.routes[caller.name]
        shop = self.config.shops[caller.shop.name]
        return Route(
            target=Target(
                partner=caller.name,
                shop_id=shop.shop_id,
                org_id=shop.org_id,
                default_source=caller.name,
            ),
            upstream=UpstreamTarget(
                org_id=shop.org_id,
                api=self.config.api_for(shop),
                key=caller.org_key,
                from_caller=True,
            ),
            # The org key is not verified until Manager answers: such callers do not get the
            # gateway to download anything on their behalf; their URLs are passed on.
            pdf="forward",
        )


def build_runtime(config: Config) -> Runtime:
    """Compile a validated configuration.

    Raises:
        ConfigError: a profile expression does not parse.
    """
    profiles: dict[str, Profile] = {
        name: compile_profile(name, profile.fields, profile.keep_unmapped)
        for name, profile in config.profiles.items()
    }
    shop_refs = {
        name: ShopRef(
            name=name,
            org_id=shop.org_id,
            shop_id=shop.shop_id,
            hosts=frozenset(shop.hosts),
            accept_org_keys=shop.accept_org_keys,
        )
        for name, shop in config.shops.items()
    }
    routes: dict[str, Route] = {}
    for name, partner in config.partners.items():
        shop = config.shops[partner.shop]
        assert shop.manager_key is not None  # config guarantees a key for shops with partners
        routes[name] = Route(
            target=Target(
                partner=name,
                shop_id=shop.shop_id,
                org_id=shop.org_id,
                default_source=partner.source or name,
                require_reference=partner.require_reference,
                profile=profiles[partner.profile] if partner.profile else None,
            ),
            upstream=UpstreamTarget(
                org_id=shop.org_id,
                api=config.api_for(shop),
                key=shop.manager_key.get_secret_value(),
            ),
            pdf=partner.pdf,
            rate_per_min=partner.rate_per_min,
        )
    registry = KeyRegistry(
        [(name, p.key_sha256, shop_refs[p.shop]) for name, p in config.partners.items()],
        [ref for ref in shop_refs.values() if ref.accept_org_keys],
    )
    return Runtime(
        config=config,
        registry=registry,
        routes=routes,
        callbacks=build_callback_targets(config),
        partners_of_org=build_partners_of_org(config),
        webhook_secrets=tuple(
            (shop.org_id, shop.webhook_secret.get_secret_value().encode())
            for shop in config.shops.values()
            if shop.webhook_secret is not None
        ),
    )


def build_partners_of_org(config: Config) -> dict[str, frozenset[str]]:
    """Which partners' orders each org receives (through the partners' shops)."""
    found: dict[str, set[str]] = {}
    for name, partner in config.partners.items():
        found.setdefault(config.shops[partner.shop].org_id, set()).add(name)
    return {org_id: frozenset(names) for org_id, names in found.items()}


def build_callback_targets(config: Config) -> dict[str, CallbackTarget]:
    """Each listening partner's callback URL (checked against the callback policy) and key.

    Raises:
        ConfigError: a callback URL the policy refuses (e.g. http without callback_allow_http).
    """
    policy = callback_policy(config.webhooks)
    targets: dict[str, CallbackTarget] = {}
    for name, partner in config.partners.items():
        if partner.callback_url is None:
            continue
        try:
            check_url(partner.callback_url, policy)
        except EgressRefusedError as exc:
            allowable = "allowed" in exc.reason or "address" in exc.reason
            hint = " (or set webhooks.callback_allow_*)" if allowable else ""
            raise ConfigError(f"partners.{name}.callback_url: {exc.reason}{hint}") from None
        assert partner.callback_secret is not None  # config: a callback_url needs its secret
        key = parse_whsec(partner.callback_secret.get_secret_value())
        assert key is not None  # config checked the secret's form
        targets[name] = CallbackTarget(partner.callback_url, key)
    return targets
