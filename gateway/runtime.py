"""A configuration compiled for serving: key registry, profiles, per-partner targets.

Built once per load (start-up or SIGHUP) and swapped as one object, so a request sees either the
old configuration or the new one, never a mix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.auth import Caller, KeyRegistry, ShopRef
from gateway.config import Config
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
    return Runtime(config=config, registry=registry, routes=routes)
