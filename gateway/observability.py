"""Logs and metrics: one JSON object per log line with a fixed set of fields, Prometheus metrics.

Redaction is by construction: only the fields named in ``LOG_FIELDS`` are written, so a key, token,
customer's name, email, address or PDF cannot reach the log by accident. Request-scoped fields
(request id, partner, shop) come from a context variable set once per request.

A line goes straight to the gateway's own handler when ``setup_logging`` installed it and nothing
else listens (the serving case): same fields, same JSON, without building a ``LogRecord`` and
passing it through ``logging``'s handler chain on every request. Otherwise (tests' handlers, an
exception with its stack) the line takes the ordinary ``logging`` path.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TextIO

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from gateway.codec import dump_line

LOGGER_NAME: Final = "gateway"
# Every field a log line may carry. Nothing else is written, whatever a caller passes.
LOG_FIELDS: Final = (
    "request_id",
    "partner",
    "shop",
    "method",
    "path",
    "status",
    "code",
    "duration_ms",
    "upstream_status",
    "external_reference",
    "attempt",
    "delay_ms",
    "reason",
    "org_id",
    "api",
    "config",
    "host",
    "port",
    "admin_port",
    "version",
    "replayed",
    "result",
    "attempts",
    "age_s",
)
# One dict per request, set by log_context and filled in place by bind_log_context.
_CONTEXT: ContextVar[dict[str, object] | None] = ContextVar("gateway_log_context", default=None)

log = logging.getLogger(LOGGER_NAME)


def log_event(level: int, event: str, /, *, exc_info: bool = False, **fields: object) -> None:
    """Log ``event`` with whitelisted ``fields`` (others are dropped)."""
    if log.isEnabledFor(level):
        if exc_info or not _write_direct(level, event, collect_fields(_CONTEXT.get(), fields)):
            log.log(level, event, exc_info=exc_info, extra={"fields": fields})


def _write_direct(level: int, event: str, fields: Mapping[str, object]) -> bool:
    """Write a line through the gateway's own handler, if it is the only one; False otherwise."""
    handlers = log.handlers
    if len(handlers) != 1 or log.propagate or log.filters:
        return False
    handler = handlers[0]
    if type(handler) is not LineHandler or level < handler.level:
        return False
    return handler.write_fields(level, event, fields)


def open_log_context(**fields: object) -> Token[dict[str, object] | None]:
    """Start a request's log context (``close_log_context`` ends it): ``log_context`` without a
    generator, for the middleware that runs on every request."""
    return _CONTEXT.set({**(_CONTEXT.get() or {}), **fields})


def close_log_context(token: Token[dict[str, object] | None]) -> None:
    _CONTEXT.reset(token)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Fields added to every log line written inside the block (one request)."""
    token = open_log_context(**fields)
    try:
        yield
    finally:
        close_log_context(token)


def bind_log_context(**fields: object) -> None:
    """Add fields to the current block's context (e.g. the partner, once authenticated)."""
    current = _CONTEXT.get()
    if current is None:
        _CONTEXT.set(dict(fields))
    else:
        current.update(fields)


def current_log_fields() -> Mapping[str, object]:
    """The fields bound so far in this request (the middleware reads partner and status here)."""
    return _CONTEXT.get() or {}


def collect_fields(
    context: Mapping[str, object] | None, fields: Mapping[str, object]
) -> dict[str, object]:
    """The whitelisted, non-null fields of a line: the context's, then the event's (which win)."""
    collected: dict[str, object] = {}
    for source in (context or {}, fields):
        for name in LOG_FIELDS:
            if name in source and source[name] is not None:
                collected[name] = source[name]
    return collected


def _collect(record: logging.LogRecord) -> dict[str, object]:
    fields = collect_fields(_CONTEXT.get(), getattr(record, "fields", None) or {})
    if record.exc_info and record.exc_info[0] is not None:
        # Type and frames only: an exception's message may quote input (health data).
        fields["exc_type"] = record.exc_info[0].__name__
        frames = traceback.extract_tb(record.exc_info[2])
        fields["stack"] = [f"{f.filename}:{f.lineno} {f.name}" for f in frames[-8:]]
    return fields


def split_millis(created: float) -> tuple[int, int]:
    """Whole seconds and milliseconds of a Unix time, rounded as ``datetime.fromtimestamp`` rounds
    (microseconds half to even, carried into the second), so the text is the same."""
    fraction, whole = math.modf(created)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:  # before 1970: modf's fraction is negative
        whole, micros = whole - 1, micros + 1_000_000
    return int(whole), micros // 1000


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "event", …whitelisted fields}`` on one line."""

    def __init__(self) -> None:
        super().__init__()
        # The last second formatted, and its text: the date is formatted once per second.
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        event = record.msg if isinstance(record.msg, str) else "log"
        return self.format_fields(record.created, record.levelname, event, _collect(record))

    def format_fields(
        self, created: float, level_name: str, event: str, fields: Mapping[str, object]
    ) -> str:
        return self.encode_fields(created, level_name, event, fields).decode("utf-8")

    def encode_fields(
        self, created: float, level_name: str, event: str, fields: Mapping[str, object]
    ) -> bytes:
        """The line as UTF-8 JSON, without its newline."""
        line: dict[str, object] = {
            "time": self.format_time(created),
            "level": level_name.lower(),
            "event": event,
        }
        line.update(fields)
        return dump_line(line)

    def format_time(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``."""
        whole, millis = split_millis(created)
        second = self._second
        if second[0] != whole:
            text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second = (whole, text)
        return f"{second[1]}.{millis:03d}+00:00"


class TextFormatter(logging.Formatter):
    """``time level event key=value …`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        event = record.msg if isinstance(record.msg, str) else "log"
        return self.format_fields(record.created, record.levelname, event, _collect(record))

    def format_fields(
        self, created: float, level_name: str, event: str, fields: Mapping[str, object]
    ) -> str:
        when = datetime.fromtimestamp(created, UTC).strftime("%H:%M:%S")
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{when} {level_name.lower():7} {event} {pairs}".rstrip()


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """One write per record, straight to the file descriptor when the stream has one.

    A request log line is written on every request: the stream layers, the flush and the
    handler lock of ``StreamHandler`` cost more than the line itself. ``os.write`` of a whole
    line is atomic for pipes (up to PIPE_BUF) and files opened for appending.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        try:
            stream.flush()
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None  # StringIO and friends: the ordinary path

    def emit(self, record: logging.LogRecord) -> None:
        if self._fd is None:
            super().emit(record)
            return
        try:
            self._write(self.format(record))
        except Exception:  # a log write must never fail a request
            self.handleError(record)

    def write_fields(self, level: int, event: str, fields: Mapping[str, object]) -> bool:
        """Write a line without a ``LogRecord``; False when this handler cannot (no file
        descriptor, filters, another formatter): the caller goes through ``logging`` then. A
        failed write is reported as ``logging`` reports it, and not tried again."""
        formatter = self.formatter
        if self._fd is None or self.filters or type(formatter) not in _OWN_FORMATTERS:
            return False
        assert isinstance(formatter, JsonFormatter | TextFormatter)
        created, level_name = time.time(), logging.getLevelName(level)
        if isinstance(formatter, JsonFormatter):
            data = formatter.encode_fields(created, level_name, event, fields) + b"\n"
        else:
            data = (formatter.format_fields(created, level_name, event, fields) + "\n").encode()
        self.acquire()
        try:
            self._write_bytes(data)
        except Exception:  # a log write must never fail a request
            self.handleError(log.makeRecord(log.name, level, "", 0, event, (), None))
        finally:
            self.release()
        return True

    def _write(self, line: str) -> None:
        self._write_bytes((line + "\n").encode("utf-8"))

    def _write_bytes(self, line: bytes) -> None:
        assert self._fd is not None
        data = memoryview(line)
        while data:  # a pipe may take a long line in parts
            data = data[os.write(self._fd, data) :]


_OWN_FORMATTERS: Final = (JsonFormatter, TextFormatter)


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Route the gateway's logger to stdout as JSON (or text); quiet aiohttp's own loggers."""
    # The logging HOWTO's optimisations: records need no caller frame, thread or process info.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    # aiohttp logs request lines and payload fragments; the gateway writes its own request log.
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


RECENT_REQUESTS: Final = 50


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One partner request as the request log line tells it (the console's recent requests)."""

    at: float  # Unix time the answer was given
    method: str
    path: str
    status: int
    duration_ms: float
    partner: str | None = None
    code: str | None = None  # the contract's error code, None for a success
    reference: str | None = None
    request_id: str | None = None


# What the ring buffer keeps per request: time, method, path, status, duration, then the bound
# fields partner, code, external_reference, request_id (as the log context holds them).
_Kept = tuple[float, str, str, int, float, object, object, object, object]


class RequestLog:
    """The request log: the one place where a request's log fields become its log line.

    It also keeps the last ``size`` requests of this process in memory (a ring buffer), so that
    the operator console shows exactly what the log says, from the same fields. A plain tuple per
    request (about 0.1 µs); the console's records are built only when the page asks.
    """

    def __init__(self, size: int = RECENT_REQUESTS, *, clock: Callable[[], float] = time.time):
        self._recent: deque[_Kept] = deque(maxlen=size)
        self._clock = clock

    def write(self, *, method: str, path: str, status: int, duration_ms: float) -> None:
        """Log the request's line (with the fields bound during the request) and keep it."""
        fields = current_log_fields()
        self._recent.append(
            (
                self._clock(), method, path, status, duration_ms, fields.get("partner"),
                fields.get("code"), fields.get("external_reference"), fields.get("request_id"),
            )
        )  # fmt: skip
        log_event(20, "request", method=method, path=path, status=status, duration_ms=duration_ms)

    def recent(self) -> list[RequestRecord]:
        """The kept requests, newest first."""
        return [
            RequestRecord(
                at, method, path, status, duration_ms,
                _text(partner), _text(code), _text(reference), _text(request_id),
            )
            for at, method, path, status, duration_ms, partner, code, reference, request_id
            in reversed(self._recent)
        ]  # fmt: skip


def _text(value: object) -> str | None:
    return None if value is None else str(value)


_MANAGER_TROUBLE: Final = frozenset({401, 403, 429})


@dataclass(slots=True)
class UpstreamHealth:
    """When Manager last answered with success, and when (and how) it last failed: this process.

    A failure is a call that got no answer (``error``, ``timeout``), or 401/403/429/5xx; Manager's
    refusal of an order (400/404/409/422) is the order's problem, not Manager's, and counts as
    neither.
    """

    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_failure: str | None = None  # Manager's status, or "error" / "timeout"

    def record(self, status: str, at: float) -> None:
        code = int(status) if status.isdigit() else None
        if code is not None and 200 <= code < 300:
            self.last_success_at = at
        elif code is None or code in _MANAGER_TROUBLE or code >= 500:
            self.last_failure_at, self.last_failure = at, status


DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15)


class Metrics:
    """The contract's metrics, in a registry of their own (one per app, so tests do not collide)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Partner requests by partner and answer code.",
            ["partner", "code"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "gateway_request_duration_seconds", "Time to answer a partner request.",
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_requests = Counter(
            "gateway_upstream_requests", "Calls to Manager's order-requests by status.",
            ["status"], registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds", "Time of one call to Manager.",
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.token_fetches = Counter(
            "gateway_token_fetches", "Token exchanges with Manager by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self.pdf_fetches = Counter(
            "gateway_pdf_fetches", "Prescription PDF downloads by result.", ["result"], registry=r
        )
        self.config_info = Gauge(
            "gateway_config_info", "The active configuration (sha256 of the file).",
            ["digest"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Partner requests being processed.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip

        self.outbox_depth = Gauge(
            "gateway_outbox_depth", "Stored orders by status (queued: waiting; failed: given up).",
            ["status"], registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.outbox_oldest = Gauge(
            "gateway_outbox_oldest_seconds", "Age of the oldest queued order (0 when none).",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.outbox_deliveries = Counter(
            "gateway_outbox_deliveries", "Delivery attempts of stored orders by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self.webhooks_received = Counter(
            "gateway_webhooks_received", "Manager webhooks by result.", ["result"], registry=r
        )
        self.callbacks = Counter(
            "gateway_callbacks", "Partner callback attempts by result.", ["result"], registry=r
        )
        # Not a Prometheus metric: the console's "last success, last failure" of this process.
        self.upstream = UpstreamHealth()
        # Children bound once per label value: labels() (a lock, a tuple, a dict) on every request
        # costs more than the increment itself. Partners come from the configuration and codes
        # are HTTP statuses, so these stay small.
        self._requests_by: dict[tuple[str, int], Counter] = {}
        self._upstream_by: dict[str, Counter] = {}

    def count_request(self, partner: str, status: int, seconds: float) -> None:
        """One answered partner request: by partner and code, and its duration."""
        child = self._requests_by.get((partner, status))
        if child is None:
            child = self.requests.labels(partner=partner, code=str(status))
            self._requests_by[(partner, status)] = child
        child.inc()
        self.request_duration.observe(seconds)

    def count_upstream(self, status: str, at: float) -> None:
        """One call to Manager's order-requests answered ``status`` (or ``error``/``timeout``)."""
        child = self._upstream_by.get(status)
        if child is None:
            child = self._upstream_by[status] = self.upstream_requests.labels(status=status)
        child.inc()
        self.upstream.record(status, at)

    def render(self) -> bytes:
        """The text exposition: this process's metrics, or all workers' when there are several."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def set_config(self, digest: str) -> None:
        self.config_info.clear()
        self.config_info.labels(digest=digest[:16]).set(1)
