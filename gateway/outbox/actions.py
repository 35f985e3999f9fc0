"""The operator's actions on stored orders, one function each for the CLI and the console."""

from __future__ import annotations

from gateway.config import OutboxConfig
from gateway.observability import log_event
from gateway.outbox import OutboxStore


async def retry_order(
    store: OutboxStore, config: OutboxConfig, partner: str, reference: str, now: float
) -> bool:
    """A ``failed`` order goes back to ``queued``, due now, with a fresh ``max_age_hours``.

    False when there is no failed order with this reference (nothing changed).
    """
    done = await store.requeue(partner, reference, now, now + config.max_age_s)
    if done:
        log_event(20, "outbox_order_requeued", partner=partner, external_reference=reference)
    return done


async def drop_order(store: OutboxStore, partner: str, reference: str, now: float) -> bool:
    """Delete a queued or failed order's stored body; its status becomes ``dropped``.

    False when there is no queued or failed order with this reference (nothing changed).
    """
    done = await store.drop(partner, reference, now)
    if done:
        log_event(30, "outbox_order_dropped", partner=partner, external_reference=reference)
    return done
