"""Tests for gateway.observability: redacting log formatters, log context, per-app metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability import (
    JsonFormatter,
    Metrics,
    RequestLog,
    TextFormatter,
    bind_log_context,
    current_log_fields,
    log,
    log_context,
    log_event,
    setup_logging,
)

AIOHTTP_LOGGERS = ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the gateway's (and aiohttp's) logger configuration back after the test."""
    saved = (list(log.handlers), log.level, log.propagate)
    saved_aiohttp = {name: logging.getLogger(name).level for name in AIOHTTP_LOGGERS}
    try:
        yield
    finally:
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
        for name, level in saved_aiohttp.items():
            logging.getLogger(name).setLevel(level)


def capture(formatter: logging.Formatter, level: int = logging.DEBUG) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return stream


@pytest.fixture
def json_lines(restore_logging: None) -> Callable[[], list[dict[str, object]]]:
    stream = capture(JsonFormatter())

    def lines() -> list[dict[str, object]]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    return lines


@pytest.fixture
def text_lines(restore_logging: None) -> Callable[[], list[str]]:
    stream = capture(TextFormatter())
    return lambda: stream.getvalue().splitlines()


# --- JsonFormatter ------------------------------------------------------------------------------


def test_json_line_has_time_level_event_and_the_given_fields(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    before = datetime.now(UTC)

    log_event(logging.INFO, "order_forwarded", partner="drx", status=200, duration_ms=12.5)

    [line] = json_lines()
    assert set(line) == {"time", "level", "event", "partner", "status", "duration_ms"}
    assert (line["level"], line["event"]) == ("info", "order_forwarded")
    assert (line["partner"], line["status"], line["duration_ms"]) == ("drx", 200, 12.5)
    when = datetime.fromisoformat(str(line["time"]))
    assert when.utcoffset() == timedelta(0)
    assert abs(when - before) < timedelta(seconds=5)


@pytest.mark.parametrize(
    ("level", "name"),
    [(logging.DEBUG, "debug"), (logging.WARNING, "warning"), (logging.ERROR, "error")],
)
def test_json_level_is_lowercase(
    json_lines: Callable[[], list[dict[str, object]]], level: int, name: str
) -> None:
    log_event(level, "e")

    assert json_lines()[0]["level"] == name


def test_fields_outside_the_whitelist_are_never_written(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    secrets = {
        "customer_name": "Max Mustermann",
        "customer_email": "max@example.com",
        "address_street": "Musterstr. 1",
        "apikey": "partner-key-123",
        "key_sha256": "ab" * 32,
        "token": "eyJhbGciOiJIUzI1NiJ9.secret",
        "authorization": "Bearer eyJ.secret",
        "pdf": "%PDF-1.7 content",
        "prescription_pdf_base64": "JVBERi0xLjcK",
        "body": {"customer_name": "Max Mustermann"},
    }

    log_event(logging.INFO, "order_received", partner="drx", **secrets)

    [line] = json_lines()
    assert set(line) == {"time", "level", "event", "partner"}
    raw = json.dumps(line)
    for value in ("Mustermann", "max@example.com", "Musterstr", "partner-key-123", "secret"):
        assert value not in raw
    assert "PDF" not in raw and "JVBER" not in raw and "ab" * 32 not in raw


def test_none_fields_are_left_out(json_lines: Callable[[], list[dict[str, object]]]) -> None:
    log_event(logging.INFO, "e", partner="drx", upstream_status=None)

    assert "upstream_status" not in json_lines()[0]


def test_message_arguments_and_non_string_messages_are_not_written(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    log.warning("customer %s", "Max Mustermann")
    log.warning({"customer_email": "max@example.com"})

    first, second = json_lines()
    assert first["event"] == "customer %s"
    assert second["event"] == "log"
    assert "Mustermann" not in json.dumps(first)
    assert "max@example.com" not in json.dumps(second)


def test_events_below_the_level_are_not_written(
    restore_logging: None,
) -> None:
    stream = capture(JsonFormatter(), level=logging.INFO)

    log_event(logging.DEBUG, "noise", partner="drx")
    log_event(logging.INFO, "kept")

    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["kept"]


def test_exception_logs_type_and_stack_but_not_its_message(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    def parse_customer() -> None:
        raise ValueError("max@example.com is not a valid customer")

    try:
        parse_customer()
    except ValueError:
        log_event(logging.ERROR, "unhandled_error", exc_info=True, request_id="r-1")

    [line] = json_lines()
    assert line["exc_type"] == "ValueError"
    assert line["request_id"] == "r-1"
    stack = line["stack"]
    assert isinstance(stack, list) and stack
    assert any("parse_customer" in frame for frame in stack)
    assert all(re.match(r"^.+:\d+ \S+$", frame) for frame in stack)
    raw = json.dumps(line)
    assert "max@example.com" not in raw
    assert "not a valid customer" not in raw
    assert "Traceback" not in raw


def test_log_without_exc_info_has_no_exception_fields(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log_event(logging.WARNING, "handled")

    assert "exc_type" not in json_lines()[0] and "stack" not in json_lines()[0]


# --- log context --------------------------------------------------------------------------------


def test_context_fields_appear_inside_the_block_and_are_reset_after(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    with log_context(request_id="r-1", path="/api/v1/external-order"):
        log_event(logging.INFO, "inside")
        bind_log_context(partner="drx", shop="berlin", customer_name="Max")
        log_event(logging.INFO, "bound")
        assert current_log_fields() == {
            "request_id": "r-1",
            "path": "/api/v1/external-order",
            "partner": "drx",
            "shop": "berlin",
            "customer_name": "Max",
        }
    log_event(logging.INFO, "outside")

    inside, bound, outside = json_lines()
    assert inside["request_id"] == "r-1" and "partner" not in inside
    assert (bound["request_id"], bound["partner"], bound["shop"]) == ("r-1", "drx", "berlin")
    assert "customer_name" not in bound  # the context is whitelisted too
    assert set(outside) == {"time", "level", "event"}
    assert current_log_fields() == {}


def test_nested_context_adds_and_restores(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    with log_context(request_id="outer"):
        with log_context(partner="drx"):
            log_event(logging.INFO, "inner")
        log_event(logging.INFO, "after_inner")

    inner, after = json_lines()
    assert (inner["request_id"], inner["partner"]) == ("outer", "drx")
    assert after["request_id"] == "outer" and "partner" not in after


def test_event_fields_override_context_fields(
    json_lines: Callable[[], list[dict[str, object]]],
) -> None:
    with log_context(status=200, partner="drx"):
        log_event(logging.INFO, "e", status=502)

    line = json_lines()[0]
    assert (line["status"], line["partner"]) == (502, "drx")


def test_context_is_reset_when_the_block_raises() -> None:
    with pytest.raises(KeyError), log_context(request_id="r-1"):
        bind_log_context(partner="drx")
        raise KeyError("x")

    assert current_log_fields() == {}


async def test_concurrent_requests_do_not_share_context() -> None:
    async def request(request_id: str, partner: str, seen: asyncio.Event) -> object:
        with log_context(request_id=request_id):
            bind_log_context(partner=partner)
            seen.set()
            await other_bound.wait()
            return dict(current_log_fields())

    a_bound, b_bound = asyncio.Event(), asyncio.Event()
    other_bound = asyncio.Event()
    task_a = asyncio.ensure_future(request("r-a", "alpha", a_bound))
    task_b = asyncio.ensure_future(request("r-b", "beta", b_bound))
    await a_bound.wait()
    await b_bound.wait()
    other_bound.set()

    assert await task_a == {"request_id": "r-a", "partner": "alpha"}
    assert await task_b == {"request_id": "r-b", "partner": "beta"}


# --- TextFormatter ------------------------------------------------------------------------------


def test_text_line_is_time_level_event_then_key_values(
    text_lines: Callable[[], list[str]],
) -> None:
    with log_context(request_id="r-1"):
        log_event(logging.INFO, "order_forwarded", partner="drx", status=200, token="secret")
    log_event(logging.WARNING, "bare")

    first, second = text_lines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d info    order_forwarded request_id=r-1 partner=drx status=200", first
    )
    assert re.fullmatch(r"\d\d:\d\d:\d\d warning bare", second)


def test_text_line_of_an_exception_has_type_but_not_message(
    text_lines: Callable[[], list[str]],
) -> None:
    try:
        raise ValueError("max@example.com")
    except ValueError:
        log_event(logging.ERROR, "unhandled_error", exc_info=True)

    [line] = text_lines()
    assert "exc_type=ValueError" in line
    assert "max@example.com" not in line


# --- setup_logging ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "starts"), [("json", "{"), ("text", "")])
def test_setup_logging_writes_the_chosen_format_to_the_stream(
    restore_logging: None, fmt: str, starts: str
) -> None:
    stream = io.StringIO()
    setup_logging("warning", fmt, stream=stream)

    log_event(logging.INFO, "dropped")
    log_event(logging.WARNING, "kept", partner="drx")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(starts)
    assert "kept" in lines[0] and "partner" in lines[0]
    if fmt == "json":
        assert json.loads(lines[0])["event"] == "kept"
    else:
        assert not lines[0].startswith("{")
    assert logging.getLogger("aiohttp.access").level == logging.CRITICAL


# --- Metrics ------------------------------------------------------------------------------------

CONTRACT_METRICS = {
    "gateway_requests_total",
    "gateway_request_duration_seconds_bucket",
    "gateway_request_duration_seconds_count",
    "gateway_upstream_requests_total",
    "gateway_upstream_duration_seconds_bucket",
    "gateway_upstream_duration_seconds_count",
    "gateway_token_fetches_total",
    "gateway_pdf_fetches_total",
}


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    assert metrics.render().decode() == text  # one process: render() is the registry's text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def exercise(metrics: Metrics) -> None:
    metrics.requests.labels(partner="drx", code="ok").inc()
    metrics.request_duration.observe(0.03)
    metrics.upstream_requests.labels(status="200").inc()
    metrics.upstream_duration.observe(0.02)
    metrics.token_fetches.labels(result="ok").inc()
    metrics.pdf_fetches.labels(result="blocked").inc()


def test_metrics_expose_the_contracts_names_and_labels() -> None:
    metrics = Metrics()
    exercise(metrics)

    found = samples(metrics)

    assert CONTRACT_METRICS <= {name for name, _ in found}
    assert found[("gateway_requests_total", (("code", "ok"), ("partner", "drx")))] == 1
    assert found[("gateway_upstream_requests_total", (("status", "200"),))] == 1
    assert found[("gateway_token_fetches_total", (("result", "ok"),))] == 1
    assert found[("gateway_pdf_fetches_total", (("result", "blocked"),))] == 1
    assert found[("gateway_request_duration_seconds_count", ())] == 1
    assert found[("gateway_request_duration_seconds_bucket", (("le", "0.05"),))] == 1
    assert found[("gateway_request_duration_seconds_bucket", (("le", "0.025"),))] == 0
    assert found[("gateway_upstream_duration_seconds_count", ())] == 1


def test_two_metrics_instances_have_separate_registries() -> None:
    first = Metrics()
    second = Metrics()  # a shared default registry would raise "Duplicated timeseries" here

    first.requests.labels(partner="drx", code="ok").inc(3)
    second.requests.labels(partner="drx", code="ok").inc()

    assert first.registry is not second.registry
    assert b"gateway_requests_total" in first.render()
    key = ("gateway_requests_total", (("code", "ok"), ("partner", "drx")))
    assert samples(first)[key] == 3
    assert samples(second)[key] == 1


def test_set_config_keeps_only_the_active_digest() -> None:
    metrics = Metrics()

    metrics.set_config("a" * 64)
    metrics.set_config("b" * 64)

    info = {k: v for k, v in samples(metrics).items() if k[0] == "gateway_config_info"}
    assert info == {("gateway_config_info", (("digest", "b" * 16),)): 1}


@pytest.mark.usefixtures("restore_logging")
def test_a_real_file_gets_one_whole_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    with path.open("a", encoding="utf-8") as stream:
        setup_logging("info", "json", stream=stream)
        log_event(logging.INFO, "request", status=200, note="x" * 70_000)  # note: not a field
        log_event(logging.INFO, "request", status=201, partner="p" * 70_000)

    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["status"] for line in lines] == [200, 201]
    assert len(json.loads(lines[1])["partner"]) == 70_000  # a long line arrives whole


# --- the direct path (no LogRecord) and the request log --------------------------------------


def _read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("through", ["direct", "logging"])
def test_request_line_is_the_same_whichever_path_writes_it(tmp_path: Path, through: str) -> None:
    path = tmp_path / "gateway.log"
    with path.open("a", encoding="utf-8") as stream:
        setup_logging("info", "json", stream=stream)
        if through == "logging":  # a filter keeps the line off the direct path
            log.handlers[0].addFilter(lambda record: True)
        with log_context(request_id="r1", partner="drx", customer_name="Max"):
            bind_log_context(shop="shop1", upstream_status=201, email="max@example.com")
            RequestLog().write(
                method="POST", path="/api/v1/external-order", status=201, duration_ms=1.25
            )
            log_event(logging.WARNING, "upstream_retry", attempt=1, token="secret")

    request, retry = _read_lines(path)
    # The context's fields first, then the event's, each in LOG_FIELDS' order.
    assert list(request) == [
        "time", "level", "event", "request_id", "partner", "shop", "upstream_status", "method",
        "path", "status", "duration_ms",
    ]  # fmt: skip
    assert {k: v for k, v in request.items() if k != "time"} == {
        "level": "info", "event": "request", "request_id": "r1", "partner": "drx",
        "shop": "shop1", "method": "POST", "path": "/api/v1/external-order", "status": 201,
        "duration_ms": 1.25, "upstream_status": 201,
    }  # fmt: skip
    assert retry["level"] == "warning" and retry["attempt"] == 1 and "token" not in retry
    stamp = datetime.fromisoformat(str(request["time"]))
    assert abs(stamp - datetime.now(UTC)) < timedelta(minutes=1)


@pytest.mark.usefixtures("restore_logging")
def test_request_line_below_the_level_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    with path.open("a", encoding="utf-8") as stream:
        setup_logging("warning", "json", stream=stream)
        RequestLog().write(method="POST", path="/x", status=200, duration_ms=0.5)

    assert path.read_text() == ""


@pytest.mark.usefixtures("restore_logging")
def test_text_format_takes_the_direct_path_too(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    with path.open("a", encoding="utf-8") as stream:
        setup_logging("info", "text", stream=stream)
        with log_context(request_id="r2"):
            RequestLog().write(method="GET", path="/y", status=404, duration_ms=0.1)

    (line,) = path.read_text().splitlines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d info    request request_id=r2 method=GET path=/y status=404 "
        r"duration_ms=0.1",
        line,
    )


def test_log_time_is_what_datetime_would_write() -> None:
    formatter = JsonFormatter()
    rng = random.Random(7)
    stamps = [0.0, 0.0005, 0.9999995, 1_800_000_000.9999996, 1_800_000_000.0004999, -1.5]
    stamps += [rng.uniform(0, 4e9) for _ in range(5000)]
    stamps += [rng.randrange(2**31) + rng.randrange(10**6) / 1e6 for _ in range(5000)]
    for stamp in stamps:
        expected = datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
        assert formatter.format_time(stamp) == expected, stamp


NOW_S = 1_800_000_000.0


def test_bound_children_count_like_labels() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.count_request("drx", 201, 0.003)
    metrics.count_request("unknown", 401, 0.001)
    metrics.count_upstream("201", NOW_S)
    metrics.count_upstream("503", NOW_S)

    values = samples(metrics)
    assert values[("gateway_requests_total", (("code", "201"), ("partner", "drx")))] == 3
    assert values[("gateway_requests_total", (("code", "401"), ("partner", "unknown")))] == 1
    assert values[("gateway_request_duration_seconds_count", ())] == 4
    assert values[("gateway_upstream_requests_total", (("status", "201"),))] == 1
    assert values[("gateway_upstream_requests_total", (("status", "503"),))] == 1
    assert metrics.upstream.last_failure == "503"


@pytest.mark.usefixtures("restore_logging")
def test_a_failed_direct_write_is_reported_like_logging_does_and_fails_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails (EPIPE)
    with os.fdopen(write_end, "w") as stream:
        setup_logging("info", "json", stream=stream)
        RequestLog().write(method="POST", path="/x", status=200, duration_ms=0.5)

    assert "Logging error" in capsys.readouterr().err
