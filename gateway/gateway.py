"""The running gateway's shared state: the active configuration and the long-lived services.

One object per process, held by both the partner app and the admin app. A reload replaces
``runtime`` in one assignment; the upstream session and token cache are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from gateway.manager import ManagerClient
from gateway.observability import Metrics, RequestLog
from gateway.outbox.deliverer import Outbox
from gateway.pdf import PdfFetcher
from gateway.runtime import Runtime
from gateway.state import StateStore


@dataclass
class Gateway:
    runtime: Runtime
    state: StateStore
    metrics: Metrics = field(default_factory=Metrics)
    request_log: RequestLog = field(default_factory=RequestLog)  # the partner port's requests
    clock: Callable[[], float] = time.time  # the injected clock (tests move it by hand)
    created_at: float = 0.0  # Unix time; the console's uptime
    manager_client: ManagerClient | None = None
    pdf_fetcher: PdfFetcher | None = None
    outbox: Outbox | None = None  # store and forward, when [outbox] enabled
    started: bool = False
    draining: bool = False

    @property
    def config_digest(self) -> str:
        """Short id of the active configuration (sha256 of the file), for logs and /readyz."""
        return self.runtime.config.digest[:16]

    @property
    def manager(self) -> ManagerClient:
        if self.manager_client is None:
            raise RuntimeError("the gateway's services are not started")
        return self.manager_client

    @property
    def pdf(self) -> PdfFetcher:
        if self.pdf_fetcher is None:
            raise RuntimeError("the gateway's services are not started")
        return self.pdf_fetcher


GATEWAY_KEY: Final = web.AppKey("gateway", Gateway)
