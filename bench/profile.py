"""Where one target's CPU goes under load: py-spy samples, grouped by library and gateway module.

Starts the fake Manager (as ``make bench`` does) and one target, sends a warm-up order, then
samples the target with ``py-spy record --format raw --nonblocking`` while wrk loads it at 32
connections, and prints markdown tables: self time by what the code is for, by library (and
which gateway module called it) and by function, and inclusive time of the gateway's functions.

    .venv/bin/pip install py-spy        # a tool, not a dependency of the project
    .venv/bin/python bench/profile.py --target gateway --seconds 15 [--raw FILE]

Everything listens on 127.0.0.1; every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import bench as b  # bench/bench.py: the fake Manager, the targets, wrk

_FRAME: Final = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
TARGETS: Final = ("gateway", "gateway+outbox", "tuned", "naive")


def parse_frame(frame: str) -> tuple[str, str]:
    """``"external_order (gateway/routes.py:42)"`` → ``("external_order", "gateway/routes.py")``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match["func"], match["file"]


def library_of(path: str, stack_files: Sequence[str]) -> str:
    """The library a frame's file belongs to (aiohttp split into server and client).

    py-spy shortens paths on ``sys.path``: ``aiohttp/web_protocol.py``, ``asyncio/runners.py``.
    """
    for prefix in ("site-packages/", "/python3.11/", "/python3.12/", "/python3.13/"):
        if prefix in path:
            path = path.split(prefix, 1)[1]
    name = path.split("/", 1)[0].removesuffix(".py")
    if name == "gateway":
        return "gateway." + Path(path).stem
    if name == "aiohttp":
        client = any(f.startswith(("aiohttp/client", "aiohttp/connector")) for f in stack_files)
        return "aiohttp client" if client else "aiohttp server"
    aliases = {"asyncio": "event loop", "selectors": "event loop", "pydantic_core": "pydantic"}
    return aliases.get(name, name or "?")


def gateway_caller(stack_files: Sequence[str]) -> str:
    """The innermost gateway module on the stack (who asked for the library's work); the
    modules that only start the server (cli, server) do not count."""
    for path in reversed(stack_files):
        if "/gateway/" in f"/{path}" and "site-packages" not in path:
            module = Path(path).stem
            if module not in _STARTERS:
                return "gateway." + module
    return ""


_STARTERS: Final = frozenset({"__main__", "cli", "server", "workers"})

# What the code is for: (row, the gateway modules whose own time it is, the libraries whose time
# it is wherever they are called from, the libraries whose time it is when one of those modules
# called them). The first row that claims a sample gets it.
PURPOSES: Final = (
    ("aiohttp server (parse, route, middleware dispatch, respond)", (), ("aiohttp server",), ()),
    ("aiohttp client (the call to Manager)", (), ("aiohttp client", "yarl", "multidict"), ()),
    ("event loop, tasks, the deadline's timer", (), ("event loop",), ()),
    ("request log", ("observability",), ("logging", "<frozen posixpath>"), ()),
    ("metrics (prometheus-client)", (), ("prometheus_client",), ()),
    ("validation (pydantic and the rule pass)", ("models",), ("pydantic",), ()),
    ("normalisation", ("normalize",), (), ("normalize",)),
    ("JSON in and out (codec)", ("codec",), (), ("codec",)),
    ("middleware and handler, own code",
     ("middleware", "routes", "intake"), (), ("middleware", "routes")),
    ("Manager client's own layers (and the token cache)", ("manager", "tokens"), (), ()),
    ("idempotency, memory store, order pipeline",
     ("idempotency", "memory", "orders"), (), ("orders", "memory", "idempotency")),
    ("auth", ("auth",), (), ("auth",)),
)  # fmt: skip


def purpose_of(library: str, caller: str) -> str:
    """The PURPOSES row of a sample's leaf library and its innermost gateway caller."""
    own = library.removeprefix("gateway.") if library.startswith("gateway.") else None
    called_by = caller.removeprefix("gateway.")
    for row, modules, libraries, callers in PURPOSES:
        if own is not None and own in modules:
            return row
        if own is None and (library in libraries or (caller and called_by in callers)):
            return row
    return "other"


def summarise_raw(
    text: str,
) -> tuple[int, Counter[str], Counter[str], Counter[str], Counter[str]]:
    """Total samples; self time by (library ← caller); inclusive time by gateway function;
    self time by function; self time by purpose (PURPOSES)."""
    total = 0
    by_purpose: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        files = [path for _, path in frames]
        func, path = frames[-1]
        library = library_of(path, files)
        caller = gateway_caller(files)
        key = library if library.startswith("gateway.") or not caller else f"{library} ← {caller}"
        by_library[key] += count
        by_purpose[purpose_of(library, caller)] += count
        by_function[f"{func} ({library})"] += count
        seen = set()
        for name, file in frames:
            if "/gateway/" in f"/{file}" and "site-packages" not in file:
                qualified = f"{Path(file).stem}.{name}"
                if qualified not in seen:
                    seen.add(qualified)
                    inclusive[qualified] += count
    return total, by_library, inclusive, by_function, by_purpose


def render(
    total: int, table: Counter[str], title: str, limit: int, per_request_us: float | None
) -> list[str]:
    head = f"| {title} | % of samples |" + (" µs/req |" if per_request_us else "")
    lines = [head, "|---|---:|" + ("---:|" if per_request_us else "")]
    for name, count in table.most_common(limit):
        share = count / total if total else 0.0
        cell = f" {share * per_request_us:.1f} |" if per_request_us else ""
        lines.append(f"| {name} | {share * 100:.1f} |{cell}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profile", description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=TARGETS, default="gateway")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw output here")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        print("profile: py-spy is not installed (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(b.ROOT))
    opts = b.Options(1, args.seconds, 1, args.connections, 0, keep_tmp=False)
    with b.workdir(False) as tmp, contextlib.ExitStack() as stack:
        bench = b.Bench(opts, tmp, stack)
        target = bench.start_one(args.target)
        target.server.check_alive()
        status, reply = b.post_order(target.port, target.path, b.order_body("PROFILE-warmup"))
        if status != 200:
            print(f"profile: the warm-up order got {status}: {reply[:200]!r}", file=sys.stderr)
            return 2
        raw = tmp / "profile.raw"
        pids = target.server.pids
        wrk_result: list[b.WrkRun] = []
        loader = threading.Thread(
            target=lambda: wrk_result.append(
                b.run_wrk(bench.wrk, target, args.connections, args.seconds + 2, 1, bench.run_id)
            )
        )
        loader.start()
        time.sleep(1)  # noqa: TID251 - a synchronous harness: let the load settle first
        cpu_before = b.cpu_seconds(pids)
        cmd = [
            py_spy, "record", "--format", "raw", "--nonblocking", "--rate", str(args.rate),
            "--duration", str(args.seconds), "--pid", str(target.server.pid), "--output", str(raw),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        cpu = b.cpu_seconds(pids) - cpu_before
        loader.join()
        run = wrk_result[0]
        text = raw.read_text()
        if args.raw:
            args.raw.write_text(text)
    total, by_library, inclusive, by_function, by_purpose = summarise_raw(text)
    cpu_us = cpu * 1e6 / (run.rps * args.seconds) if run.rps else None
    print(f"### Profile of *{args.target}*: {total} samples over {args.seconds} s")
    print()
    print(
        f"`{' '.join(['bench/profile.py', *(argv or sys.argv[1:])])}`: wrk -c{args.connections} "
        f"{run.rps:,.0f} req/s while sampled (py-spy slows the target), "
        f"CPU {cpu_us or 0:.0f} µs/req, errors {run.error_count}."
    )
    print()
    print("\n".join(render(total, by_purpose, "self time: what for", 20, cpu_us)))
    print()
    print("\n".join(render(total, by_library, "self time: library ← gateway caller", 40, cpu_us)))
    print()
    print("\n".join(render(total, inclusive, "inclusive: gateway function", args.top, cpu_us)))
    print()
    print("\n".join(render(total, by_function, "self time: function", args.top, cpu_us)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
