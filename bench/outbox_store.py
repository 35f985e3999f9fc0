"""The SQLite outbox store alone: orders per second and CPU per order, without HTTP.

Each of ``--concurrency`` tasks runs an order's store path as the gateway does (claim, put the
sealed order, settle it delivered), with ``--work-us`` of busy CPU on the event loop per order to
stand for the rest of the gateway (parse, validate, Manager's call). No network; the file is in a
temporary directory. Compare two versions of the code on the same machine, one after the other.

    .venv/bin/python bench/outbox_store.py --seconds 4 --work-us 300
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.outbox import NewOrder, OrderStatus, Remember, Settlement
from gateway.outbox.sealing import Sealer, new_key
from gateway.outbox.sqlite import SqliteOutbox
from gateway.state import StoredReply

BODY = b"x" * 900  # about the size of a sealed bench order
REPLY = StoredReply(200, b'{"id":"or_bench","status":"received"}', "application/json")


def burn(micros: float) -> None:
    """Busy CPU on the event loop (the gateway's own work per order)."""
    end = time.perf_counter() + micros / 1e6
    while time.perf_counter() < end:
        pass


async def measure(seconds: float, concurrency: int, work_us: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as home:
        sealer = Sealer([SecretStr(new_key())])
        store = SqliteOutbox(Path(home) / "outbox.db", sealer)
        await store.open()
        done = 0

        async def orders(worker: int) -> None:
            nonlocal done
            for number in range(10**9):
                reference, now = f"{worker}-{number}", time.time()
                key = f"idem:{reference}"
                burn(work_us / 2)
                await store.claim(key, "fp", 30)
                sealed = sealer.seal(BODY)
                order = NewOrder("p", reference, "org", sealed, now, now + 30, now + 3600)
                await store.put(order, Remember(key, "fp", REPLY, 3600))
                burn(work_us / 2)
                delivered = Settlement(OrderStatus.DELIVERED, time.time())
                await store.settle("p", reference, delivered, Remember(key, "fp", REPLY, 3600))
                done += 1

        tasks = [asyncio.create_task(orders(worker)) for worker in range(concurrency)]
        await asyncio.sleep(1)  # warm up
        start_done, start, start_cpu = done, time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        count = done - start_done
        rate = count / (time.perf_counter() - start)
        cpu_us = (time.process_time() - start_cpu) * 1e6 / max(count, 1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()
    return rate, cpu_us


def main() -> int:
    parser = argparse.ArgumentParser(prog="outbox_store", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--work-us", type=float, default=300)
    args = parser.parse_args()
    rate, cpu_us = uvloop.run(measure(args.seconds, args.concurrency, args.work_us))
    print(
        f"{rate:,.0f} orders/s, {cpu_us:.0f} µs CPU per order (both threads), "
        f"{args.concurrency} at once, {args.work_us:g} µs of other work each"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
