"""``serve --workers N``: N gateway processes on the same ports (SO_REUSEPORT), one supervisor.

The kernel spreads new connections over the processes; each has its own event loop, and the
shared state (Redis) keeps the promises. The supervisor forwards SIGTERM/SIGINT (drain) and
SIGHUP (reload) to every worker, and stops all of them if one dies, so that the orchestrator
restarts a whole, consistent gateway. Metrics are aggregated over the workers with
prometheus-client's multiprocess mode (one directory of memory-mapped files).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from types import FrameType
from typing import Final

from prometheus_client import multiprocess

from gateway.signals import SignalLatch

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# A worker that drained exits 0. One ended by the relayed SIGTERM itself got it before its first
# line of Python could latch it (signals.py): it never served, so nothing was cut short.
CLEAN_EXITS: Final = frozenset({0, -signal.SIGTERM})


def build_worker_command(
    config: str | None, host: str | None, port: int | None, metrics_dir: str
) -> list[str]:
    """The command line of one worker: ``serve`` with ``--reuse-port``."""
    command = [sys.executable, "-m", "gateway", "serve", "--reuse-port"]
    command += ["--metrics-dir", metrics_dir]
    if config:
        command += ["--config", config]
    if host:
        command += ["--host", host]
    if port:
        command += ["--port", str(port)]
    return command


class Supervisor:
    """Runs the workers and relays signals to them."""

    def __init__(self, count: int, config: str | None, host: str | None, port: int | None):
        self.directory = tempfile.mkdtemp(prefix="gateway-metrics-")
        command = build_worker_command(config, host, port, self.directory)
        # prometheus-client reads this when a worker imports it: values go to shared files.
        env = {**os.environ, MULTIPROC_ENV: self.directory}
        self.workers = [subprocess.Popen(command, env=env) for _ in range(count)]
        self.stopping = False
        self.failed = False

    def relay(self, signum: int, frame: FrameType | None = None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            signum = signal.SIGTERM
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def wait(self) -> int:
        """Until every worker has exited: 0 after a clean drain, 1 if one failed or died."""
        pending = {worker.pid for worker in self.workers}
        while pending:
            pid, status = os.wait()
            if pid not in pending:
                continue
            pending.discard(pid)
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
            if not self.stopping:
                # A worker died on its own: stop the rest rather than run short-handed.
                self.failed = True
                self.relay(signal.SIGTERM)
            elif os.waitstatus_to_exitcode(status) not in CLEAN_EXITS:
                self.failed = True
        return 1 if self.failed else 0

    def cleanup(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def run_workers(
    count: int,
    config: str | None,
    host: str | None,
    port: int | None,
    *,
    latch: SignalLatch | None = None,
) -> int:
    """``serve --workers N``: start, relay signals, exit with the workers."""
    supervisor = Supervisor(count, config, host, port)
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, supervisor.relay) for sig in signals}
    for signum in latch.take() if latch is not None else ():
        supervisor.relay(signum)  # what arrived while this process started
    try:
        return supervisor.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        supervisor.cleanup()
