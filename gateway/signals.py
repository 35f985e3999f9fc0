"""Signals that reach ``serve`` while it starts: latched at once, honoured once it serves.

A worker of ``serve --workers N`` spends its first second importing and starting; a SIGTERM then
(the supervisor relaying an orchestrator's stop) would end it by the default action, which the
supervisor reads as a crash. Standard library only: it is installed before anything slow loads.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Final

LATCHED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SignalLatch:
    """Records SIGTERM, SIGINT and SIGHUP until the running server installs its own handlers."""

    def __init__(self) -> None:
        self.received: list[int] = []

    @classmethod
    def install(cls) -> SignalLatch:
        latch = cls()
        for signum in LATCHED:
            signal.signal(signum, latch.record)
        return latch

    def record(self, signum: int, frame: FrameType | None = None) -> None:
        if signum not in self.received:
            self.received.append(signum)

    def take(self) -> list[int]:
        """What arrived so far (once each, in order); call after installing the real handlers."""
        received, self.received = self.received, []
        return received
