"""Partner callbacks (contract section 11): Standard Webhooks messages, queued in the outbox's store
and sent by a background sender with the outbox's backoff.

The messages (body, signature, headers) are built by pure functions; ``Callbacks`` sends what is
due over its own session, whose resolver applies the callback address policy
(:mod:`gateway.egress`). A message carries no customer data and nothing of Manager's texts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import orjson

from gateway.config import OutboxConfig, WebhooksConfig
from gateway.egress import (
    EgressPolicy,
    EgressRefusedError,
    EgressUnresolvedError,
    GuardedResolver,
    callback_policy,
    check_url,
    find_cause,
)
from gateway.errors import StateUnavailableError
from gateway.ledger import to_iso
from gateway.observability import Metrics, log_event
from gateway.outbox import CallbackMessage, LedgerEntry, OrderStatus, OutboxStore
from gateway.outbox.polling import run_polling
from gateway.retry import outbox_delay

USER_AGENT: Final = "telemed-gateway-callbacks/1"
BATCH: Final = 16
LEASE_EXTRA_S: Final = 30.0
# The delivery states a settled order is announced with (a retried order is still queued).
SETTLED_TYPES: Final = {
    OrderStatus.DELIVERED: "order.delivered",
    OrderStatus.REJECTED: "order.rejected",
    OrderStatus.FAILED: "order.failed",
}


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    """Where one partner's callbacks go, and the key they are signed with."""

    url: str
    key: bytes  # the base64-decoded part of the partner's whsec_ secret


def build_body(message: CallbackMessage) -> bytes:
    """The JSON body of section 11: the same bytes on every attempt of one message."""
    return orjson.dumps(
        {
            "type": message.type,
            "timestamp": to_iso(message.created_at),
            "data": {
                "external_reference": message.reference,
                "order_request_id": message.order_request_id,
                "status": message.status,
                "manager_status": message.manager_status,
                "event": message.event,
            },
        }
    )


def build_signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` (Standard Webhooks)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def build_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": build_signature(key, message_id, timestamp, body),
    }


def build_settled_message(
    entry: LedgerEntry, message_id: str, now: float, expires_at: float
) -> CallbackMessage | None:
    """The callback announcing an order the deliverer settled, or None (still queued, dropped)."""
    kind = SETTLED_TYPES.get(entry.status)
    if kind is None:
        return None
    return CallbackMessage(
        id=message_id, partner=entry.partner, type=kind, reference=entry.reference,
        status=entry.status.value, order_request_id=entry.order_request_id,
        manager_status=entry.manager_status, event=None, created_at=now, expires_at=expires_at,
    )  # fmt: skip


def settled_message_id(entry: LedgerEntry) -> str:
    """The ``webhook-id`` of a settled order's callback: the same for the same order and news,
    so that storing it twice (the order was sent again after a crash) stores it once."""
    seed = f"{entry.partner}\x00{entry.reference}\x00{entry.created_at!r}\x00{entry.status}"
    return f"msg_{hashlib.sha256(seed.encode()).hexdigest()[:32]}"


class CallbackFailedError(Exception):
    """One attempt did not succeed; ``reason`` is safe to log (no URL, no secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Callbacks:
    """Queues callbacks in the outbox's store and sends them, each until a 2xx or its end."""

    def __init__(
        self,
        store: OutboxStore,
        outbox: OutboxConfig,
        webhooks: WebhooksConfig,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        resolver_inner: aiohttp.abc.AbstractResolver | None = None,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.webhooks = webhooks
        self._metrics = metrics
        self.clock = clock
        self._rand = rand
        self._resolver = GuardedResolver(callback_policy(webhooks), resolver_inner)
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    @property
    def policy(self) -> EgressPolicy:
        return callback_policy(self.webhooks)

    def reconfigure(self, outbox: OutboxConfig, webhooks: WebhooksConfig) -> None:
        """Apply a reloaded configuration to later attempts."""
        self.outbox, self.webhooks = outbox, webhooks
        self._resolver.reconfigure_policy(callback_policy(webhooks))

    async def start(self) -> None:
        if self._session is not None:
            return
        # No keep-alive pool: every attempt resolves and checks under the current policy.
        connector = aiohttp.TCPConnector(
            resolver=self._resolver, use_dns_cache=False, force_close=True, limit=BATCH
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,  # no proxy or .netrc credentials from the environment
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._resolver.close()

    # --- queueing ------------------------------------------------------------------------------

    async def enqueue_settled(
        self, entry: LedgerEntry, targets: Mapping[str, CallbackTarget]
    ) -> None:
        """The ``Outbox.on_settled`` hook: announce a settled order to a partner that listens."""
        if entry.partner not in targets:
            return
        now = self.clock()
        message = build_settled_message(
            entry, settled_message_id(entry), now, now + self.outbox.max_age_s
        )
        if message is None:
            return
        try:
            await self.store.put_callback(message)
        except StateUnavailableError:
            log_event(40, "callback_not_queued", partner=entry.partner, result=message.type)
            return
        self._wake.set()

    def wake(self) -> None:
        """Look for due callbacks now (one was just queued)."""
        self._wake.set()

    # --- sending -------------------------------------------------------------------------------

    async def run(
        self, targets: Callable[[], Mapping[str, CallbackTarget]], *, poll_s: float
    ) -> None:
        """Send due callbacks until :meth:`stop`; ``targets`` is read afresh each round."""
        await run_polling(
            lambda: self.run_once(targets()),
            wake=self._wake,
            stopping=lambda: self._stopping,
            poll_s=poll_s,
            error_event="callback_sender_error",
        )

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run_once(self, targets: Mapping[str, CallbackTarget]) -> int:
        """Send the callbacks due now (at most one batch); how many were taken."""
        now = self.clock()
        lease_s = self.webhooks.callback_timeout_s + LEASE_EXTRA_S
        due = await self.store.take_due_callbacks(now, lease_s, BATCH)
        await asyncio.gather(*(self._attempt(message, targets) for message in due))
        return len(due)

    async def _attempt(
        self, message: CallbackMessage, targets: Mapping[str, CallbackTarget]
    ) -> None:
        target = targets.get(message.partner)
        if target is None:  # the partner's callback_url was removed meanwhile
            await self._give_up(message, "the partner has no callback_url any more")
            return
        try:
            await self.send_callback(message, target)
        except CallbackFailedError as exc:
            now = self.clock()
            if now >= message.expires_at:
                await self._give_up(message, exc.reason)
                return
            attempts = message.attempts + 1
            delay = outbox_delay(
                attempts, self.outbox.retry_min_s, self.outbox.retry_max_s, self._rand
            )
            await self.store.settle_callback(message.id, now, min(now + delay, message.expires_at))
            self._metrics.callbacks.labels(result="retried").inc()
            log_event(
                30, "callback_retried", partner=message.partner, reason=exc.reason,
                attempts=attempts, external_reference=message.reference,
            )  # fmt: skip
            return
        await self.store.settle_callback(message.id, self.clock(), None)
        self._metrics.callbacks.labels(result="delivered").inc()
        log_event(
            20, "callback_delivered", partner=message.partner, result=message.type,
            external_reference=message.reference,
        )  # fmt: skip

    async def _give_up(self, message: CallbackMessage, reason: str) -> None:
        await self.store.settle_callback(message.id, self.clock(), None)
        self._metrics.callbacks.labels(result="failed").inc()
        log_event(
            40, "callback_failed", partner=message.partner, reason=reason,
            attempts=message.attempts + 1, external_reference=message.reference,
        )  # fmt: skip

    async def send_callback(self, message: CallbackMessage, target: CallbackTarget) -> None:
        """One signed ``POST``; success is any 2xx, and a redirect is not followed.

        Raises:
            CallbackFailedError: refused by the policy, unreachable, timed out, or not a 2xx.
        """
        try:
            url = check_url(target.url, self.policy)
        except EgressRefusedError as exc:
            raise CallbackFailedError(f"the callback URL is refused: {exc.reason}") from None
        await self.start()
        assert self._session is not None
        body = build_body(message)
        headers = build_headers(target.key, message.id, int(self.clock()), body)
        timeout = aiohttp.ClientTimeout(total=self.webhooks.callback_timeout_s)
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                status = response.status
        except TimeoutError:
            raise CallbackFailedError("the receiver did not answer in time") from None
        except (aiohttp.ClientError, OSError, EgressRefusedError, EgressUnresolvedError) as exc:
            raise CallbackFailedError(_describe_failure(exc)) from None
        if not 200 <= status < 300:
            raise CallbackFailedError(f"the receiver answered HTTP {status}")


def _describe_failure(exc: BaseException) -> str:
    refused = find_cause(exc, EgressRefusedError)
    if refused is not None:
        return f"the callback URL is refused: {refused.reason}"
    if find_cause(exc, EgressUnresolvedError) is not None:
        return "the callback host name could not be resolved"
    return "the receiver could not be reached"
