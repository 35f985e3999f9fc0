"""The Manager client: sends one order request (v1 with the org key, v2 with a cached JWT).

Retries transient failures with backoff inside one deadline and maps every answer to the
contract's errors. No aiohttp exception leaves this module.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import aiohttp

from gateway.config import ManagerConfig
from gateway.errors import (
    GatewayError,
    UnauthorizedError,
    UpstreamAuthFailedError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.observability import Metrics, bind_log_context, log_event
from gateway.retry import (
    Outcome,
    backoff_delay,
    classify_status,
    parse_retry_after,
    to_retry_after_header,
)
from gateway.tokens import (
    SharedTokens,
    Token,
    TokenCache,
    TokenReplyError,
    parse_token_reply,
)

MAX_ERROR_BODY: Final = 4096
STREAM_BODY_OVER: Final = 512 * 1024
USER_AGENT: Final = "telemed-gateway/0.1"
# No per-request timer: the caller's asyncio.timeout is the deadline (one timer, not two).
_NO_TIMEOUT: Final = aiohttp.ClientTimeout(total=None)


class OrgKeyRefusedError(UnauthorizedError):
    """Manager refused a caller's own org key (``accept_org_keys`` shops): the caller must act."""


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and as whom an order request goes."""

    org_id: str
    api: Literal["v1", "v2"]
    key: str
    from_caller: bool = False  # the caller's own org key (its refusal is the caller's problem)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    body: bytes
    content_type: str
    retry_after: str | None = None


# Base64 of a multiple of 3 bytes has no padding: chunks of this size concatenate cleanly.
SPLICE_CHUNK: Final = 3 * 21846


@dataclass(frozen=True, slots=True)
class SplicedBody:
    """JSON bytes with a PDF's base64 between ``head`` and ``tail``, encoded while it is sent."""

    head: bytes
    pdf: bytes | bytearray
    tail: bytes

    @property
    def length(self) -> int:
        return len(self.head) + 4 * math.ceil(len(self.pdf) / 3) + len(self.tail)

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.head
        view = memoryview(self.pdf)
        for start in range(0, len(view), SPLICE_CHUNK):
            yield binascii.b2a_base64(view[start : start + SPLICE_CHUNK], newline=False)
        yield self.tail


UpstreamBody = bytes | SplicedBody


@dataclass(slots=True)
class CallCount:
    """How many requests one send made to Manager's order-requests (a token fetch is none)."""

    value: int = 0


class _Transient(Exception):
    """An attempt failed in a way that a retry may fix."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class ManagerClient:
    """Sends order requests to Manager through one shared session (its connection pool)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: ManagerConfig,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        shared_tokens: SharedTokens | None = None,
    ) -> None:
        self._session = session
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._shared = shared_tokens
        # Token fetches and order requests both go through _post, so both use the proxy. The
        # session's trust_env stays off: config.py alone reads the environment's proxy settings.
        self._proxy = config.proxy.get_secret_value() if config.proxy is not None else None
        self.tokens = TokenCache(self._fetch_token, clock=clock, shared=shared_tokens)

    @property
    def timeout_s(self) -> float:
        """The deadline of one order request (retries included)."""
        return self._config.timeout_s

    def with_config(self, config: ManagerConfig) -> ManagerClient:
        """A client for a reloaded configuration that keeps the session and the token cache."""
        client = ManagerClient(
            self._session, config, metrics=self._metrics, clock=self._clock,
            sleep=self._sleep, rand=self._rand, shared_tokens=self._shared,
        )  # fmt: skip
        if config.base_url == self._config.base_url:
            self.tokens.rebind(client._fetch_token)  # same Manager: its tokens stay valid
            client.tokens = self.tokens
        else:
            client.tokens = TokenCache(client._fetch_token, clock=self._clock, shared=self._shared)
        return client

    async def send_order_request(
        self, target: UpstreamTarget, body: UpstreamBody, calls: CallCount | None = None
    ) -> UpstreamReply:
        """POST the envelope to Manager, retrying transient failures within ``timeout_s``.

        The first attempt runs here and a success returns at once: retries, backoff and the token
        refresh are in ``_retry``, a layer the common case does not pass through.

        ``calls``, when given, counts the requests sent to order-requests (retries included): the
        outbox's ledger reports them as an order's attempts.

        Raises:
            UpstreamRejectedError, UpstreamAuthFailedError, OrgKeyRefusedError,
            UpstreamUnavailableError, UpstreamTimeoutError.
        """
        deadline = self._clock() + self._config.timeout_s
        try:
            # The one deadline: attempts, backoff and the wait for a token all run inside it.
            async with asyncio.timeout(self._config.timeout_s):
                try:
                    reply = await self._attempt(target, body, calls)
                except (_Transient, _TokenRefused) as exc:
                    return await self._retry(target, body, deadline, exc, calls)
                if classify_status(reply.status) is Outcome.SUCCESS:
                    return reply
                return await self._retry(target, body, deadline, reply, calls)
        except TimeoutError:
            self._metrics.count_upstream("timeout", self._clock())
            raise UpstreamTimeoutError() from None

    async def _try(
        self, target: UpstreamTarget, body: UpstreamBody, calls: CallCount | None
    ) -> UpstreamReply | _Transient | _TokenRefused:
        """One more attempt (a retry), its failure as a value."""
        try:
            return await self._attempt(target, body, calls)
        except (_Transient, _TokenRefused) as exc:
            return exc

    async def _retry(
        self,
        target: UpstreamTarget,
        body: UpstreamBody,
        deadline: float,
        result: UpstreamReply | _Transient | _TokenRefused,
        calls: CallCount | None,
    ) -> UpstreamReply:
        """Decide on an attempt's ``result``: return it, fail, or wait and try again."""
        attempt = 0
        refreshed = False
        while True:
            if isinstance(result, _TokenRefused):
                raise _auth_error(target, result.reply) from None
            if isinstance(result, _Transient):
                failure = result
            else:
                reply = result
                outcome = classify_status(reply.status)
                if outcome is Outcome.SUCCESS:
                    return reply
                if outcome is Outcome.AUTH and reply.status == 401 and target.api == "v2":
                    if not refreshed:
                        # The token may have been revoked or expired early: one new token, once.
                        refreshed = True
                        log_event(20, "upstream_token_refused", upstream_status=401)
                        result = await self._try(target, body, calls)
                        continue
                if outcome is not Outcome.RETRY:
                    raise self._final_error(target, reply)
                failure = _Transient(
                    "status", reply.status, parse_retry_after(reply.retry_after, self._clock())
                )
            if attempt >= self._config.retries:
                raise self._exhausted(failure)
            delay = max(failure.retry_after or 0.0, backoff_delay(attempt, self._rand))
            if self._clock() + delay >= deadline:
                raise self._exhausted(failure)
            attempt += 1
            log_event(
                30, "upstream_retry", attempt=attempt, upstream_status=failure.status,
                reason=failure.reason, delay_ms=round(delay * 1000),
            )  # fmt: skip
            await self._sleep(delay)
            result = await self._try(target, body, calls)

    async def _attempt(
        self, target: UpstreamTarget, body: UpstreamBody, calls: CallCount | None
    ) -> UpstreamReply:
        headers = {"Content-Type": "application/json"}  # User-Agent: the session's default
        token: Token | None = None
        if target.api == "v2":
            token = await self.tokens.get(target.org_id, target.key)
            headers["Authorization"] = f"Bearer {token.value}"
        else:
            headers["apikey"] = target.key
        url = f"{self._config.base_url}/api/{target.api}/public/orgs/{target.org_id}/order-requests"
        started = time.perf_counter()
        if calls is not None:
            calls.value += 1
        reply = await self._post(url, headers, body)
        self._metrics.upstream_duration.observe(time.perf_counter() - started)
        self._metrics.count_upstream(str(reply.status), self._clock())
        bind_log_context(upstream_status=reply.status)
        if token is not None and reply.status == 401:
            await self.tokens.forget(target.org_id, target.key, token)
        return reply

    async def _post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: UpstreamBody | None,
        deadline: float | None = None,
    ) -> UpstreamReply:
        """One POST. ``deadline`` bounds it on its own (token fetches run in a task of their own,
        outside the caller's deadline); order requests are bounded by their caller's deadline.
        """
        timeout = _NO_TIMEOUT
        if deadline is not None:
            timeout = aiohttp.ClientTimeout(total=max(0.001, deadline - self._clock()))
        data: bytes | AsyncIterator[bytes] | io.BytesIO | None
        if isinstance(body, SplicedBody):
            # A fresh stream per attempt, with its length known: no chunked encoding upstream.
            data = body.chunks()
            headers = {**headers, "Content-Length": str(body.length)}
        elif body is not None and len(body) > STREAM_BODY_OVER:
            # aiohttp writes a large bytes body in one go and warns; a stream sharing the
            # bytes (not a copy) is written in chunks.
            data = io.BytesIO(body)
        else:
            data = body
        try:
            async with self._session.post(
                url,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                proxy=self._proxy,
            ) as response:
                data = await response.read()
                return UpstreamReply(
                    response.status,
                    data,
                    response.content_type,
                    response.headers.get("Retry-After"),
                )
        except aiohttp.ClientError as exc:
            if isinstance(exc, TimeoutError):
                raise  # the token fetch's own deadline: reported by the caller
            self._metrics.count_upstream("error", self._clock())
            raise _Transient(exc.__class__.__name__) from exc

    async def _fetch_token(self, org_id: str, key: str) -> Token:
        url = f"{self._config.base_url}/api/v2/public/orgs/{org_id}/auth/token"
        headers = {"apikey": key}
        deadline = self._clock() + self._config.timeout_s
        try:
            reply = await self._post(url, headers, None, deadline)
        except (_Transient, TimeoutError):
            self._metrics.token_fetches.labels(result="error").inc()
            raise
        outcome = classify_status(reply.status)
        if outcome is Outcome.SUCCESS:
            try:
                token = parse_token_reply(json.loads(reply.body), self._clock())
            except (ValueError, TokenReplyError) as exc:
                self._metrics.token_fetches.labels(result="invalid").inc()
                log_event(40, "token_reply_unusable", reason=str(exc), org_id=org_id)
                raise UpstreamUnavailableError(
                    "Manager's token reply could not be used; the order was not delivered."
                ) from None
            self._metrics.token_fetches.labels(result="ok").inc()
            log_event(20, "token_fetched", org_id=org_id)
            return token
        if outcome is Outcome.AUTH:
            self._metrics.token_fetches.labels(result="refused").inc()
            raise _TokenRefused(reply)
        self._metrics.token_fetches.labels(result="error").inc()
        if outcome is Outcome.RETRY:
            raise _Transient(
                "token_status", reply.status, parse_retry_after(reply.retry_after, self._clock())
            )
        raise UpstreamUnavailableError(f"Manager's token endpoint answered {reply.status}.")

    def _final_error(self, target: UpstreamTarget, reply: UpstreamReply) -> GatewayError:
        outcome = classify_status(reply.status)
        if outcome is Outcome.REJECTED:
            return UpstreamRejectedError(reply.status, _error_body(reply.body))
        if outcome is Outcome.AUTH:
            return _auth_error(target, reply)
        log_event(40, "upstream_failed", upstream_status=reply.status)
        return UpstreamUnavailableError(
            f"Manager answered {reply.status}; the order was not delivered."
        )

    def _exhausted(self, failure: _Transient) -> GatewayError:
        if failure.status == 429:
            return UpstreamUnavailableError(
                "Manager is asking the gateway to slow down; the order was not delivered.",
                status=503,
                retry_after_s=to_retry_after_header(failure.retry_after),
            )
        reason = f"answered {failure.status}" if failure.status else "could not be reached"
        return UpstreamUnavailableError(f"Manager {reason}; the order was not delivered.")


class _TokenRefused(Exception):
    def __init__(self, reply: UpstreamReply) -> None:
        super().__init__("token refused")
        self.reply = reply


def _auth_error(target: UpstreamTarget, reply: UpstreamReply) -> GatewayError:
    if target.from_caller:
        return OrgKeyRefusedError()
    body = _error_body(reply.body)
    log_event(40, "upstream_auth_failed", upstream_status=reply.status, reason=body.get("error"))
    return UpstreamAuthFailedError()


def _error_body(raw: bytes) -> dict[str, object]:
    if len(raw) > MAX_ERROR_BODY:
        return {"message": "Manager's answer is too large to include."}
    try:
        parsed = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        return {"message": raw.decode("utf-8", "replace")}
    return parsed if isinstance(parsed, dict) else {"body": parsed}
