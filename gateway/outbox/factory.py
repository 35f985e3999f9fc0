"""Which outbox store a configuration means: SQLite for one process, Redis for several."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config import Config
from gateway.outbox import OutboxStore
from gateway.outbox.sealing import Sealer
from gateway.outbox.sqlite import SqliteOutbox


def create_outbox_store(
    config: Config,
    *,
    owner: bool = True,
    clock: Callable[[], float] = time.time,
    max_pages: int | None = None,
) -> OutboxStore:
    """The store behind ``[outbox]``. ``owner``: the serving process (the CLI is not one).

    With ``state.backend = "redis"``, Redis: shared by every process and replica, so no process
    owns it (an order a killed process left leased is due again when its lease lapses).
    """
    if config.state.backend == "redis":
        from gateway.outbox.redis import RedisOutbox  # only then: redis-py costs memory

        assert config.state.redis_url is not None  # load_config resolved it
        url = config.state.redis_url.get_secret_value()
        return RedisOutbox(url, keys=config.outbox.keys, owner=owner)
    return SqliteOutbox(
        config.outbox.path,
        Sealer(config.outbox.keys),
        clock=clock,
        max_pages=max_pages,
        owner=owner,
    )


async def open_outbox_store(store: OutboxStore) -> str | None:
    """Open the store where it needs opening; the reason it cannot be used, or None."""
    if isinstance(store, SqliteOutbox):
        await store.open()
        return store.problem
    from gateway.outbox.redis import RedisOutbox  # the store is not SQLite: redis-py is loaded

    if isinstance(store, RedisOutbox):
        await store.open()
        return store.problem
    return None if await store.ping() else "the outbox store does not answer"
