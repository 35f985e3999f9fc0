"""The background loops' shape (order deliverer, callback sender): work while there is work,
else wait for a wake-up or the poll interval; a failed round never ends the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.errors import StateUnavailableError
from gateway.observability import log_event


async def run_polling(
    run_once: Callable[[], Awaitable[int]],
    *,
    wake: asyncio.Event,
    stopping: Callable[[], bool],
    poll_s: float,
    error_event: str,
) -> None:
    """Call ``run_once`` (how many items it took) until ``stopping()``."""
    while not stopping():
        try:
            busy = await run_once()
        except StateUnavailableError:
            busy = 0  # logged by the store; try again next round
        except Exception:  # a bug must not end the loop for good
            log_event(40, error_event, exc_info=True)
            busy = 0
        if not busy:
            try:
                await asyncio.wait_for(wake.wait(), timeout=poll_s)
            except TimeoutError:
                pass
            wake.clear()
