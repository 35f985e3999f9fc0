"""Slow and stuck clients against ``server.read_timeout_s``: real sockets on loopback.

A client that trickles its body is answered ``408 request_timeout`` and its connection is closed
(after at most the deadline again, in which aiohttp drains what still comes so that the client
sees the answer); a client that never finishes its headers has no request to answer, and its
connection is closed. The deadline is small; each test takes about a second of real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Final

from conftest import KEYS, ORDER_PATH, MakeGateway, flat_order, post_order

READ_TIMEOUT_S: Final = 0.5
WITHIN_S: Final = 3.0  # a ceiling for a loaded machine; each test takes about a second


@contextlib.asynccontextmanager
async def trickling(writer: asyncio.StreamWriter, byte: bytes) -> AsyncIterator[None]:
    """Send ``byte`` every 50 ms until the block ends (or the server closes the connection)."""

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(byte)
                await writer.drain()
                await asyncio.sleep(0.05)  # a slow client on a real socket: the point of the test

    task = asyncio.create_task(trickle())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_trickled_body_is_answered_408_and_the_connection_closed(
    make_gateway: MakeGateway,
) -> None:
    harness = await make_gateway(server={"read_timeout_s": READ_TIMEOUT_S})
    server = harness.client.server
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = (
        f"POST {ORDER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\napikey: {KEYS['acme']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    )
    writer.write(head.encode())
    started = time.monotonic()

    async with trickling(writer, b" "):
        answer = await asyncio.wait_for(reader.read(), WITHIN_S)  # until the server closes

    elapsed = time.monotonic() - started
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer
    assert b"Connection: close" in rest
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "request_timeout"
    assert READ_TIMEOUT_S <= elapsed < WITHIN_S
    # Served as before for everyone else.
    assert (await post_order(harness.client, flat_order())).status == 200


async def test_headers_that_never_finish_get_the_connection_closed(
    make_gateway: MakeGateway,
) -> None:
    harness = await make_gateway(server={"read_timeout_s": READ_TIMEOUT_S})
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.client.server.port)
    writer.write(f"POST {ORDER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode())
    started = time.monotonic()

    async with trickling(writer, b"a"):
        answer = await asyncio.wait_for(reader.read(), WITHIN_S)

    elapsed = time.monotonic() - started
    writer.close()
    assert answer == b""  # no request, so nothing to answer: the connection is closed
    assert READ_TIMEOUT_S * 0.5 <= elapsed < WITHIN_S
    assert (await post_order(harness.client, flat_order())).status == 200


async def test_a_body_within_the_deadline_is_read(make_gateway: MakeGateway) -> None:
    harness = await make_gateway(server={"read_timeout_s": READ_TIMEOUT_S})
    body = json.dumps(flat_order()).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.client.server.port)
    head = (
        f"POST {ORDER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\napikey: {KEYS['acme']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body[:10])
    await writer.drain()
    await asyncio.sleep(READ_TIMEOUT_S / 5)  # slow, but in time
    writer.write(body[10:])

    status_line = await asyncio.wait_for(reader.readline(), WITHIN_S)

    writer.close()
    assert status_line == b"HTTP/1.1 200 OK\r\n"
