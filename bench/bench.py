"""``make bench``: the gateway beside nginx and a hand-written proxy, in one run on one machine.

Starts a fake Manager (nginx, ``return 200``), then five targets that all receive the same partner
order from wrk: *direct* (the fake Manager itself), *nginx* (``proxy_pass``), *naive* and *tuned*
(``bench/proxy.py``) and *gateway* (the real one, v2 with a token, logs, metrics, idempotency).
The targets are interleaved round by round so that drift on a shared machine shows in min–max.
Then a fresh gateway fetches a 10 MiB PDF and its peak memory is read from /proc.

Everything listens on 127.0.0.1; every process started here is stopped by its PID.
See bench/README.md for how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any, Final, NoReturn

import jwt

ROOT: Final = Path(__file__).resolve().parent.parent
BENCH: Final = ROOT / "bench"
RESULTS: Final = BENCH / "results"
LUA_SCRIPT: Final = BENCH / "order.lua"
ORG: Final = "bench-org"
SHOP: Final = "bench-shop"
ORG_KEY: Final = "bench-org-key-not-a-secret"
PARTNER: Final = "bench-partner"
PARTNER_KEY: Final = "bench-partner-key-not-a-secret"
ORG_KEY_ENV: Final = "BENCH_ORG_KEY"
ORDER_PATH: Final = "/api/v1/external-order"
V1_ORDERS: Final = f"/api/v1/public/orgs/{ORG}/order-requests"
V2_ORDERS: Final = f"/api/v2/public/orgs/{ORG}/order-requests"
V2_TOKEN: Final = f"/api/v2/public/orgs/{ORG}/auth/token"
# The PDF gateway's org: the fake Manager logs the size of what it receives there (and only there).
PDF_ORG: Final = "bench-pdf-org"
RECEIVED_LOG: Final = "pdf-orders.log"
PDF_SIZE: Final = 10 * 1024 * 1024
MIB: Final = 1024 * 1024
OUTBOX_KEY_ENV: Final = "BENCH_OUTBOX_KEY"
READY_TIMEOUT_S: Final = 20.0
STOP_TIMEOUT_S: Final = 10.0
ORDER_REPLY: Final = {
    "id": "or_bench_000001",
    "status": "received",
    "external_reference": "BENCH",
    "created_at": "2026-01-01T00:00:00Z",
    "message": "order request received",
}
# Issue 13's targets, checked (not enforced: only errors and the token count fail the run).
GOALS: Final = {
    "gateway_vs_tuned": 0.7,
    "gateway_vs_naive": 1.1,
    "outbox_vs_gateway": 0.7,
    "added_p50_ms": 0.45,
    "added_p99_ms": 1.5,
    "idle_rss_mib": 60.0,
    "ready_s": 1.0,
    "pdf_peak_x": 4.0,
}


class BenchError(Exception):
    """The benchmark could not run (a server did not start, wrk failed)."""


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- /proc and ports


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together while picking, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def proc_status_kb(pid: int, name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kb(pids: Sequence[int]) -> int:
    return sum(proc_status_kb(pid, "VmRSS") for pid in pids)


class RssSampler:
    """The highest summed VmRSS of some processes, sampled every 100 ms while in use."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.max_kb = 0
        self.first_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            now_kb = rss_kb(self.pids)
            self.first_kb = self.first_kb or now_kb
            self.max_kb = max(self.max_kb, now_kb)
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- HTTP


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def order_body(reference: str, **extra: object) -> bytes:
    """A partner order like wrk's (bench/order.lua), for warm-ups and the PDF order."""
    body: dict[str, object] = {
        "external_reference": reference,
        "source": PARTNER,
        "customer_name": "Erika Musterfrau",
        "customer_email": "erika.musterfrau@example.com",
        "address_street": "Musterstrasse 12",
        "address_zip": "10115",
        "address_city": "Berlin",
        "total_amount": "67.36",
        "items": [
            {"name": "Flos 22/1", "qty": "5", "price": "8.59", "p1_id": "12345"},
            {"name": "Extrakt 25 THC", "qty": "1", "price": "24.41", "p1_id": "67890"},
        ],
        **extra,
    }
    return json.dumps(body).encode()


def post_order(
    port: int, path: str, body: bytes, key: str = PARTNER_KEY, timeout: float = 30.0
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "apikey": key}
    return http_request(port, "POST", path, body, headers, timeout)


# --------------------------------------------------------------------------- processes


@dataclass
class Server:
    """A process started here: stopped by its PID (SIGTERM, then SIGKILL), children included."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)  # the process and its children (nginx workers)
    started_at: float = 0.0
    ready_s: float | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C reaches us only
            )  # fmt: skip

    def wait_ready(self, port: int, path: str, need_200: bool) -> float:
        """Poll every 10 ms until the server answers (200 if ``need_200``); seconds since start."""
        deadline = self.started_at + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, _ = http_request(port, "GET", path, timeout=1.0)
            except OSError:
                status = 0
            if status and (status == 200 or not need_200):
                self.ready_s = time.monotonic() - self.started_at
                self.pids = [self.pid, *child_pids(self.pid)]
                return self.ready_s
            time.sleep(0.01)  # noqa: TID251 - a synchronous harness, no event loop here
        raise BenchError(f"{self.name}: no answer on port {port} within {READY_TIMEOUT_S:.0f} s")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with code {self.process.returncode}:\n{self.tail()}"
            )

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self.pids[1:]:  # workers left behind by a master that was killed
            with contextlib.suppress(OSError):
                if "nginx" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- files


def make_token() -> str:
    now = int(time.time())
    claims = {
        "iss": "pharmaone-manager-bench",
        "sub": "integration:bench",
        "org_id": ORG,
        "scopes": ["order_requests.write", "order_requests.read"],
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, secrets.token_bytes(32), algorithm="HS256")


def nginx_prelude(home: Path) -> str:
    return f"""
worker_processes 1;
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/json;
    client_max_body_size 64m;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {home}/client_body;
    proxy_temp_path {home}/proxy;
    fastcgi_temp_path {home}/fastcgi;
    uwsgi_temp_path {home}/uwsgi;
    scgi_temp_path {home}/scgi;
"""


def upstream_conf(home: Path, port: int, www: Path) -> str:
    """The fake Manager: fixed replies, a token, and the PDF as a static file.

    It checks the credentials (v1 and the token: the org key; v2: the token), so that a proxy
    that loses the key shows up as errors (401), at the price of one string comparison.
    """
    token = make_token()
    reply = json.dumps(ORDER_REPLY, separators=(",", ":"))
    token_reply = json.dumps(
        {"access_token": token, "token_type": "Bearer", "expires_in": 3600}, separators=(",", ":")
    )
    for text in (reply, token_reply):
        assert not set(text) & set("'$\\"), "nginx would interpret these characters"
    refuse = """{ return 401 '{"error":"unauthorized"}'; }"""
    key_check = f'if ($http_apikey != "{ORG_KEY}") {refuse}'
    token_check = f'if ($http_authorization != "Bearer {token}") {refuse}'
    pdf_orders = f"/api/v2/public/orgs/{PDF_ORG}/order-requests"
    pdf_token = f"/api/v2/public/orgs/{PDF_ORG}/auth/token"
    return (
        nginx_prelude(home)
        + f"""
    log_format received '$request_length $status';
    server {{
        listen 127.0.0.1:{port};
        location = {V1_ORDERS} {{ {key_check} return 200 '{reply}'; }}
        location = {V2_ORDERS} {{ {token_check} return 200 '{reply}'; }}
        location = {V2_TOKEN} {{ {key_check} return 200 '{token_reply}'; }}
        location = {pdf_orders} {{
            access_log {home}/{RECEIVED_LOG} received;
            {token_check}
            proxy_pass http://127.0.0.1:{port}/_pdf_sink;  # reads the whole body first
        }}
        location = /_pdf_sink {{ return 200 '{reply}'; }}
        location = {pdf_token} {{ {key_check} return 200 '{token_reply}'; }}
        location = /rx.pdf {{ root {www}; default_type application/pdf; }}
        location / {{ return 404 '{{"error":"not_found"}}'; }}
    }}
}}
"""
    )


def proxy_conf(home: Path, port: int, upstream_port: int) -> str:
    """The *nginx* target: proxy_pass with the org key, keep-alive to the upstream."""
    return (
        nginx_prelude(home)
        + f"""
    upstream manager {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location = {ORDER_PATH} {{
            proxy_pass http://manager{V1_ORDERS};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header apikey "{ORG_KEY}";
        }}
        location / {{ return 404 '{{"error":"not_found"}}'; }}
    }}
}}
"""
    )


def gateway_conf(
    port: int,
    admin_port: int,
    upstream_port: int,
    *,
    pdf: bool,
    redis: bool = False,
    outbox: Path | None = None,
) -> str:
    """A real configuration: v2 with a token, logs at info (JSON), metrics, idempotency on;
    with ``outbox``, the SQLite outbox in that file (its Fernet key in ``BENCH_OUTBOX_KEY``)."""
    from gateway.auth import hash_key

    text = f"""
[server]
host = "127.0.0.1"
port = {port}
admin_port = {admin_port}
shutdown_timeout_s = 5

[manager]
base_url = "http://127.0.0.1:{upstream_port}"
api = "v2"
timeout_s = 10

[shops.bench]
org_id = "{PDF_ORG if pdf else ORG}"
shop_id = "{SHOP}"
manager_key_env = "{ORG_KEY_ENV}"

[partners.{PARTNER}]
shop = "bench"
key_sha256 = "{hash_key(PARTNER_KEY)}"
source = "{PARTNER}"
pdf = "fetch"

[logging]
level = "info"
format = "json"
"""
    if redis:
        text += """
[state]
backend = "redis"
redis_url_env = "REDIS_URL"
share_tokens = true
"""
    if outbox is not None:
        text += f"""
[outbox]
enabled = true
path = "{outbox}"
key_env = "{OUTBOX_KEY_ENV}"
"""
    if pdf:
        text += f"""
[pdf]
allow_http = true
allow_networks = ["127.0.0.0/8"]
allow_ports = [{upstream_port}]
"""
    return text


def write_pdf(path: Path) -> None:
    head = b"%PDF-1.4\n%bench prescription\n"
    path.write_bytes(head + random.Random(5).randbytes(PDF_SIZE - len(head)))


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkRun:
    target: str
    connections: int
    round: int
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_us: dict[str, float]
    body_bytes: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(
    wrk: str, target: Target, connections: int, duration: int, round_no: int, run_id: str
) -> WrkRun:
    url, key = target.url, target.key
    prefix = f"{run_id}-{target.name}-c{connections}-r{round_no}"
    cmd = [
        wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
        "-s", str(LUA_SCRIPT), url, "--", prefix, key,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed on {target.name} ({done.returncode}): {done.stderr or done.stdout}"
        )
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return WrkRun(
        target.name, connections, round_no, data["requests"], data["duration_us"] / 1e6,
        data["errors"], data["latency_us"], data["body_bytes"],
    )  # fmt: skip


# --------------------------------------------------------------------------- the run


@dataclass
class Target:
    name: str
    port: int
    path: str
    server: Server  # the process whose memory and CPU are this target's
    runs: list[WrkRun] = field(default_factory=list)
    idle_rss_kb: int = 0
    load_rss_kb: int = 0
    rss_first_kb: int = 0  # VmRSS before the first measured load run, and after the last one
    rss_last_kb: int = 0
    load_cpu_s: float = 0.0
    key: str = PARTNER_KEY  # the apikey header wrk sends (direct: the org key Manager expects)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def of(self, connections: int, measured: bool = True) -> list[WrkRun]:
        return [r for r in self.runs if r.connections == connections and (r.round > 0) == measured]


@dataclass
class Options:
    rounds: int
    duration: int
    duration_1: int
    connections: int
    warmup: int
    keep_tmp: bool


class Bench:
    def __init__(self, opts: Options, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.opts = opts
        self.tmp = tmp
        self.stack = stack
        self.run_id = datetime.now(UTC).strftime("%H%M%S") + secrets.token_hex(2)
        self.wrk = find_tool("wrk")
        self.nginx = find_tool("nginx")
        ports = free_ports(15)
        self.up_port, self.ngx_port, self.naive_port, self.tuned_port = ports[:4]
        self.gw_port, self.gw_admin, self.pdf_port, self.pdf_admin = ports[4:8]
        self.redis_port, self.gwr_port, self.gwr_admin, self.gw2_port, self.gw2_admin = ports[8:13]
        self.gwo_port, self.gwo_admin = ports[13:]
        from gateway.outbox.sealing import new_key

        self.env = {
            **os.environ,
            ORG_KEY_ENV: ORG_KEY,
            OUTBOX_KEY_ENV: new_key(),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
        }
        self.targets: dict[str, Target] = {}
        self.gateway: dict[str, Any] = {}
        self.outbox: dict[str, Any] = {}
        self.pdf: dict[str, Any] = {}
        self.body_bytes = 0

    def launch(self, server: Server) -> Server:
        self.stack.callback(server.stop)
        server.start()
        return server

    def start_nginx(self, name: str, conf_text: str) -> Server:
        home = self.tmp / name
        home.mkdir(mode=0o755)
        conf = home / "nginx.conf"
        conf.write_text(conf_text)
        cmd = [self.nginx, "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")]
        return self.launch(Server(name, cmd, home / "stdout.log"))

    def start_upstream(self) -> Server:
        """The fake Manager, checked."""
        www = self.tmp / "www"
        www.mkdir(mode=0o755)
        write_pdf(www / "rx.pdf")
        os.chmod(self.tmp, 0o755)  # nginx's worker may run as another user (root starts it)
        up = self.start_nginx("upstream", upstream_conf(self.tmp / "upstream", self.up_port, www))
        up.wait_ready(self.up_port, "/", need_200=False)
        self.check_upstream()
        return up

    def start_one(self, name: str) -> Target:
        """The fake Manager and one Python target, ready (bench/profile.py samples it)."""
        self.start_upstream()
        if name in ("naive", "tuned"):
            port = self.naive_port if name == "naive" else self.tuned_port
            extra = ("--tuned",) if name == "tuned" else ("--access-log", str(self.tmp / "a.log"))
            server = self.start_proxy(name, port, *extra)
            server.wait_ready(port, "/", need_200=False)
        else:
            port, admin = self.gw_port, self.gw_admin
            outbox = self.outbox_file() if name == "gateway+outbox" else None
            server = self.start_gateway(name, port, admin, pdf=False, outbox=outbox)
            server.wait_ready(admin, "/readyz", need_200=True)
        return Target(name, port, ORDER_PATH, server)

    def outbox_file(self) -> Path:
        home = self.tmp / "outbox"
        home.mkdir(mode=0o700, exist_ok=True)
        return home / "outbox.db"

    def start_servers(self) -> None:
        """One after the other, each waited for: the time to ready is the server's own."""
        up = self.start_upstream()
        ngx = self.start_nginx("nginx", proxy_conf(self.tmp / "nginx", self.ngx_port, self.up_port))
        ngx.wait_ready(self.ngx_port, "/", need_200=False)
        naive = self.start_proxy(
            "naive", self.naive_port, "--access-log", str(self.tmp / "access.log")
        )
        naive.wait_ready(self.naive_port, "/", need_200=False)
        tuned = self.start_proxy("tuned", self.tuned_port, "--tuned")
        tuned.wait_ready(self.tuned_port, "/", need_200=False)
        gw = self.start_gateway("gateway", self.gw_port, self.gw_admin, pdf=False)
        gw.wait_ready(self.gw_admin, "/readyz", need_200=True)
        gwo = self.start_gateway(
            "gateway+outbox", self.gwo_port, self.gwo_admin, pdf=False, outbox=self.outbox_file()
        )
        gwo.wait_ready(self.gwo_admin, "/readyz", need_200=True)
        self.start_redis()
        gwr = self.start_gateway("gw-redis", self.gwr_port, self.gwr_admin, pdf=False, redis=True)
        gwr.wait_ready(self.gwr_admin, "/readyz", need_200=True)
        gw2 = self.start_gateway(
            "gw-redis-w2", self.gw2_port, self.gw2_admin, pdf=False, redis=True, workers=2
        )
        gw2.wait_ready(self.gw2_admin, "/readyz", need_200=True)
        time.sleep(0.3)  # noqa: TID251 - let the second worker bind before wrk connects
        gw2.pids = [gw2.pid, *child_pids(gw2.pid)]
        self.targets = {
            "direct": Target("direct", self.up_port, V1_ORDERS, up, key=ORG_KEY),
            "nginx": Target("nginx", self.ngx_port, ORDER_PATH, ngx),
            "naive": Target("naive", self.naive_port, ORDER_PATH, naive),
            "tuned": Target("tuned", self.tuned_port, ORDER_PATH, tuned),
            "gateway": Target("gateway", self.gw_port, ORDER_PATH, gw),
            "gateway+outbox": Target("gateway+outbox", self.gwo_port, ORDER_PATH, gwo),
            "gw-redis": Target("gw-redis", self.gwr_port, ORDER_PATH, gwr),
            "gw-redis-w2": Target("gw-redis-w2", self.gw2_port, ORDER_PATH, gw2),
        }

    def start_redis(self) -> Server:
        """redis-server on loopback, no persistence (it holds shared Manager tokens)."""
        cmd = [
            find_tool("redis-server"), "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no",
        ]  # fmt: skip
        server = self.launch(Server("redis", cmd, self.tmp / "redis.log"))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            server.check_alive()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return server
            time.sleep(0.01)  # noqa: TID251 - a synchronous harness, no event loop here
        raise BenchError("redis-server did not answer PING")

    def start_proxy(self, name: str, port: int, *extra: str) -> Server:
        cmd = [
            sys.executable, str(BENCH / "proxy.py"), "--port", str(port),
            "--upstream", f"http://127.0.0.1:{self.up_port}{V1_ORDERS}",
            "--key", ORG_KEY, "--shop", SHOP, *extra,
        ]  # fmt: skip
        return self.launch(Server(name, cmd, self.tmp / f"{name}.log"))

    def start_gateway(
        self,
        name: str,
        port: int,
        admin: int,
        *,
        pdf: bool,
        redis: bool = False,
        workers: int = 1,
        outbox: Path | None = None,
    ) -> Server:
        conf = self.tmp / f"{name}.toml"
        conf.write_text(
            gateway_conf(port, admin, self.up_port, pdf=pdf, redis=redis, outbox=outbox)
        )
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(conf)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        return self.launch(Server(name, cmd, self.tmp / f"{name}.log", env=self.env))

    def check_upstream(self) -> None:
        status, body = http_request(self.up_port, "POST", V2_TOKEN, headers={"apikey": ORG_KEY})
        if status != 200 or "access_token" not in json.loads(body):
            raise BenchError(f"the fake Manager's token endpoint answered {status}: {body!r}")
        status, _ = http_request(self.up_port, "GET", "/rx.pdf")
        if status != 200:
            raise BenchError(f"the fake Manager does not serve /rx.pdf ({status})")

    def warm_up(self) -> None:
        """One order per target (the gateway's first fetches its token), then idle memory."""
        for target in self.targets.values():
            body = order_body(f"BENCH-{self.run_id}-warmup-{target.name}")
            status, reply = post_order(target.port, target.path, body, target.key)
            if status != 200:
                raise BenchError(f"{target.name}: the warm-up order got {status}: {reply[:300]!r}")
            target.idle_rss_kb = rss_kb(target.server.pids)

    def load(self) -> None:
        opts = self.opts
        if opts.warmup:
            for target in self.targets.values():
                self.wrk_once(target, opts.connections, opts.warmup, 0, sample=False)
        for round_no in range(1, opts.rounds + 1):
            for target in self.targets.values():
                self.wrk_once(target, opts.connections, opts.duration, round_no, sample=True)
        for round_no in range(1, opts.rounds + 1):
            for target in self.targets.values():
                self.wrk_once(target, 1, opts.duration_1, round_no, sample=False)

    def wrk_once(
        self, target: Target, connections: int, duration: int, round_no: int, *, sample: bool
    ) -> None:
        target.server.check_alive()
        pids = target.server.pids
        before = cpu_seconds(pids)
        with RssSampler(pids if sample else []) as sampler:
            run = run_wrk(self.wrk, target, connections, duration, round_no, self.run_id)
        if sample:
            target.rss_first_kb = target.rss_first_kb or sampler.first_kb
            target.rss_last_kb = rss_kb(pids)
            target.load_cpu_s += cpu_seconds(pids) - before
            target.load_rss_kb = max(target.load_rss_kb, sampler.max_kb)
        target.runs.append(run)
        self.body_bytes = run.body_bytes
        label = f"round {round_no}" if round_no else "warm-up"
        print(
            f"  {label:8} c{connections:<3} {target.name:8} {run.rps:9.0f} req/s  "
            f"p50 {run.latency_us['p50'] / 1000:6.2f} ms  "
            f"p99 {run.latency_us['p99'] / 1000:6.2f} ms  errors {run.error_count}",
            flush=True,
        )

    def read_gateway(self) -> None:
        """The gateways' own view: token fetches and answers from /metrics, their logs' levels."""
        self.gateway = self.read_metrics("gateway", self.gw_admin)
        self.outbox = self.read_metrics("gateway+outbox", self.gwo_admin)
        self.outbox["deliveries"] = metric_by_label(
            self.outbox.pop("text"), "gateway_outbox_deliveries_total", "result"
        )
        self.outbox["file_bytes"] = sum(
            f.stat().st_size for f in self.outbox_file().parent.iterdir() if f.is_file()
        )
        del self.gateway["text"]

    def read_metrics(self, name: str, admin: int) -> dict[str, Any]:
        status, body = http_request(admin, "GET", "/metrics")
        text = body.decode()
        if status != 200:
            raise BenchError(f"{name} /metrics answered {status}")
        return {
            "token_fetches_ok": metric_sum(text, "gateway_token_fetches_total", 'result="ok"'),
            "token_fetches_all": metric_sum(text, "gateway_token_fetches_total", ""),
            "answers": metric_by_label(text, "gateway_requests_total", "code"),
            "upstream": metric_by_label(text, "gateway_upstream_requests_total", "status"),
            "rss_after_load_kb": rss_kb(self.targets[name].server.pids),
            "log": summarise_log(self.targets[name].server.log),
            "text": text,
        }

    def measure_pdf(self) -> None:
        """A fresh gateway fetches the 10 MiB PDF: its peak RSS (VmHWM) over idle."""
        server = self.start_gateway("gateway-pdf", self.pdf_port, self.pdf_admin, pdf=True)
        ready = server.wait_ready(self.pdf_admin, "/readyz", need_200=True)
        status, reply = post_order(self.pdf_port, ORDER_PATH, order_body(f"PDF-{self.run_id}-w"))
        if status != 200:
            raise BenchError(f"gateway-pdf: the warm-up order got {status}: {reply[:300]!r}")
        idle = proc_status_kb(server.pid, "VmRSS")
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        url = f"http://127.0.0.1:{self.up_port}/rx.pdf"
        started = time.monotonic()
        body = order_body(f"PDF-{self.run_id}-rx", prescription_url=url)
        status, reply = post_order(self.pdf_port, ORDER_PATH, body, timeout=60)
        elapsed = time.monotonic() - started
        peak = proc_status_kb(server.pid, "VmHWM")
        self.pdf = {
            "status": status,
            "reply": reply[:300].decode(errors="replace") if status != 200 else "",
            "pdf_bytes": PDF_SIZE,
            "ready_s": ready,
            "idle_rss_kb": idle,
            "peak_rss_kb": peak,
            "rss_after_kb": proc_status_kb(server.pid, "VmRSS"),
            "peak_over_idle_mib": (peak - idle) / 1024,
            "peak_over_idle_x": (peak - idle) * 1024 / PDF_SIZE,
            "order_s": elapsed,
            "upstream_received_bytes": self.received_bytes(2),
            "base64_bytes": 4 * -(-PDF_SIZE // 3),
        }
        server.stop()

    def received_bytes(self, count: int) -> int | None:
        """The request size of the ``count``-th order the fake Manager logged for the PDF org.

        ``return 200`` discards a body without counting it, so that location proxies to a sink
        instead: nginx reads the whole body first, and ``$request_length`` shows whether all of the
        base64 PDF arrived.
        """
        log = self.tmp / "upstream" / RECEIVED_LOG
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = log.read_text().splitlines() if log.exists() else []
            if len(lines) >= count:
                return int(lines[count - 1].split()[0])
            time.sleep(0.05)  # noqa: TID251 - a synchronous harness, no event loop here
        return None

    def run(self) -> None:
        print("starting the fake Manager and the targets …", flush=True)
        self.start_servers()
        for t in self.targets.values():
            print(f"  {t.name:8} ready in {t.server.ready_s or 0:.3f} s on {t.url}", flush=True)
        self.warm_up()
        print("load (interleaved) …", flush=True)
        self.load()
        self.read_gateway()
        for name in ("nginx", "naive", "tuned", "gateway", "gateway+outbox"):
            self.targets[name].server.stop()
        for name in ("gw-redis", "gw-redis-w2"):
            self.targets[name].server.stop()
        print("10 MiB PDF through a fresh gateway …", flush=True)
        self.measure_pdf()


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if path is None:
        raise BenchError(f"{name} is not installed (bench/run.sh installs it with apt-get)")
    return path


def metric_sum(text: str, name: str, label: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_by_label(text: str, name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(rf'{name}\{{.*{label}="([^"]*)".*\}} (\S+)$', line)
        if match:
            found[match.group(1)] = found.get(match.group(1), 0.0) + float(match.group(2))
    return found


def summarise_log(path: Path) -> dict[str, Any]:
    """Lines by level, and the events logged above info (what looked wrong)."""
    levels: dict[str, int] = {}
    events: dict[str, int] = {}
    other = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            other += 1
            continue
        level = str(record.get("level"))
        levels[level] = levels.get(level, 0) + 1
        if level not in ("info", "debug"):
            events[record.get("event", "?")] = events.get(record.get("event", "?"), 0) + 1
    return {"lines_by_level": levels, "warning_events": events, "non_json_lines": other}


# --------------------------------------------------------------------------- the report


def summarise(bench: Bench) -> dict[str, Any]:
    opts = bench.opts
    direct = bench.targets["direct"]
    d50 = mean(r.latency_us["p50"] for r in direct.of(1))
    d99 = mean(r.latency_us["p99"] for r in direct.of(1))
    out: dict[str, Any] = {}
    for name, t in bench.targets.items():
        load, single = t.of(opts.connections), t.of(1)
        p50_1 = mean(r.latency_us["p50"] for r in single)
        p99_1 = mean(r.latency_us["p99"] for r in single)
        requests = sum(r.requests for r in load)
        out[name] = {
            "rps": mean(r.rps for r in load),
            "rps_min": min(r.rps for r in load),
            "rps_max": max(r.rps for r in load),
            "p50_ms": mean(r.latency_us["p50"] for r in load) / 1000,
            "p99_ms": mean(r.latency_us["p99"] for r in load) / 1000,
            "p50_1_ms": p50_1 / 1000,
            "p99_1_ms": p99_1 / 1000,
            "added_p50_ms": (p50_1 - d50) / 1000,
            "added_p99_ms": (p99_1 - d99) / 1000,
            "errors": sum(r.error_count for r in t.runs),
            "idle_rss_mib": t.idle_rss_kb / 1024,
            "load_rss_mib": t.load_rss_kb / 1024,
            "cpu_us_per_req": t.load_cpu_s * 1e6 / requests if requests else 0.0,
            "load_requests": requests,
            "rss_first_mib": t.rss_first_kb / 1024,
            "rss_last_mib": t.rss_last_kb / 1024,
            "ready_s": t.server.ready_s,
        }
    return out


def failures(
    summary: dict[str, Any], gateways: dict[str, dict[str, Any]], pdf: dict[str, Any]
) -> list[str]:
    why = [
        f"{name}: {row['errors']} errors (must be 0)"
        for name, row in summary.items()
        if row["errors"]
    ]
    for name, gateway in gateways.items():
        if gateway.get("token_fetches_ok") != 1 or gateway.get("token_fetches_all") != 1:
            why.append(
                f"{name}: {gateway.get('token_fetches_all'):g} token requests "
                f"({gateway.get('token_fetches_ok'):g} ok) during the run (must be exactly 1)"
            )
    if pdf.get("status") != 200:
        why.append(f"gateway-pdf: the 10 MiB PDF order got {pdf.get('status')}: {pdf.get('reply')}")
    elif (pdf.get("upstream_received_bytes") or 0) < pdf.get("base64_bytes", 0):
        why.append(
            f"gateway-pdf: Manager received {pdf.get('upstream_received_bytes')} bytes, less than "
            f"the PDF's {pdf.get('base64_bytes')} bytes of base64"
        )
    return why


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    wrk = subprocess.run([find_tool("wrk"), "-v"], capture_output=True, text=True, check=False)
    ngx = subprocess.run([find_tool("nginx"), "-v"], capture_output=True, text=True, check=False)
    import aiohttp

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wrk": (wrk.stdout or wrk.stderr).split()[1] if (wrk.stdout or wrk.stderr) else "?",
        "nginx": ngx.stderr.strip().rsplit("/", 1)[-1],
    }


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _check(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(report: dict[str, Any]) -> str:
    m, o, s = report["machine"], report["options"], report["targets"]
    lines = [
        f"### Benchmark, {m['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}; Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, wrk {m['wrk']}, nginx {m['nginx']}. "
        f"Run: {o['rounds']} round(s) × {o['duration']} s at {o['connections']} connections, then "
        f"{o['rounds']} × {o['duration_1']} s at 1 connection, targets interleaved; "
        f"body {report['body_bytes']} bytes; wrk, the fake Manager and the target share the CPUs.",
        "",
        f"| target | req/s @{o['connections']} | min–max | p50 / p99 ms @{o['connections']} "
        "| p50 / p99 ms @1 | added p50 / p99 ms @1 | errors | RSS idle / load MiB "
        "| CPU µs/req | ready s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in s.items():
        added = "" if name == "direct" else f"{r['added_p50_ms']:+.2f} / {r['added_p99_ms']:+.2f}"
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['rps_min']:,.0f}–{r['rps_max']:,.0f} "
            f"| {_ms(r['p50_ms'])} / {_ms(r['p99_ms'])} "
            f"| {_ms(r['p50_1_ms'])} / {_ms(r['p99_1_ms'])} "
            f"| {added} | {r['errors']} | {r['idle_rss_mib']:.1f} / {r['load_rss_mib']:.1f} "
            f"| {r['cpu_us_per_req']:.0f} | {r['ready_s']:.3f} |"
        )
    lines += ["", *render_goals(report)]
    return "\n".join(lines) + "\n"


def render_goals(report: dict[str, Any]) -> list[str]:
    s, g, p, o = report["targets"], report["gateway"], report["pdf"], report["outbox"]
    gw, gwo = s["gateway"], s["gateway+outbox"]
    vs_tuned, vs_naive = report["ratios"]["gateway_vs_tuned"], report["ratios"]["gateway_vs_naive"]
    vs_gateway = report["ratios"]["outbox_vs_gateway"]
    peak_x = p.get("peak_over_idle_x", float("nan"))
    received = p.get("upstream_received_bytes") or 0
    rows = [
        ("req/s vs tuned proxy", f"≥ {GOALS['gateway_vs_tuned']:.1f}×", f"{vs_tuned:.2f}×",
         vs_tuned >= GOALS["gateway_vs_tuned"]),
        ("req/s vs naive proxy", f"≥ {GOALS['gateway_vs_naive']:.1f}×", f"{vs_naive:.2f}×",
         vs_naive >= GOALS["gateway_vs_naive"]),
        ("gateway+outbox req/s vs gateway", f"≥ {GOALS['outbox_vs_gateway']:.1f}×",
         f"{vs_gateway:.2f}×", vs_gateway >= GOALS["outbox_vs_gateway"]),
        ("added p50 @1 connection", f"≤ {GOALS['added_p50_ms']} ms",
         f"{gw['added_p50_ms']:.2f} ms", gw["added_p50_ms"] <= GOALS["added_p50_ms"]),
        ("added p99 @1 connection", f"≤ {GOALS['added_p99_ms']} ms",
         f"{gw['added_p99_ms']:.2f} ms", gw["added_p99_ms"] <= GOALS["added_p99_ms"]),
        ("idle RSS", f"≤ {GOALS['idle_rss_mib']:.0f} MiB", f"{gw['idle_rss_mib']:.1f} MiB",
         gw["idle_rss_mib"] <= GOALS["idle_rss_mib"]),
        ("RSS under load", "", f"{gw['load_rss_mib']:.1f} MiB", True),
        ("RSS first → last load run", "", _growth(gw), True),
        ("gateway+outbox: RSS first → last load run", "", _growth(gwo), True),
        ("start to /readyz 200", f"≤ {GOALS['ready_s']:.0f} s", f"{gw['ready_s']:.3f} s",
         gw["ready_s"] <= GOALS["ready_s"]),
        ("10 MiB PDF: peak RSS over idle", f"≤ {GOALS['pdf_peak_x']:.0f}× the PDF",
         f"{p.get('peak_over_idle_mib', float('nan')):.1f} MiB = {peak_x:.2f}× "
         f"(answer {p.get('status')}, Manager got {received / MIB:.1f} MiB)",
         p.get("status") == 200 and peak_x <= GOALS["pdf_peak_x"]),
        ("errors", "0", str(gw["errors"]), gw["errors"] == 0),
        ("token requests during the run", "1", f"{g['token_fetches_all']:g}",
         g["token_fetches_all"] == 1),
        ("gateway+outbox: token requests", "1", f"{o['token_fetches_all']:g}",
         o["token_fetches_all"] == 1),
    ]  # fmt: skip
    out = ["| gateway | target | measured | met |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {_check(ok) if b else ''} |" for a, b, c, ok in rows]
    answers = ", ".join(f"{k}: {v:g}" for k, v in sorted(g["answers"].items()))
    log = g["log"]
    warnings = ", ".join(f"{k} ×{v}" for k, v in log["warning_events"].items()) or "none"
    deliveries = ", ".join(f"{k}: {v:g}" for k, v in sorted(o["deliveries"].items()))
    out += [
        "",
        f"Gateway answers (from /metrics): {answers}. Log lines by level: "
        f"{json.dumps(log['lines_by_level'])}; above info: {warnings}.",
        f"gateway+outbox: inline deliveries {deliveries or 'none'}; outbox files "
        f"{o['file_bytes'] / MIB:.1f} MiB after the run.",
    ]
    return out


def _growth(row: dict[str, Any]) -> str:
    orders = row["load_requests"]
    return f"{row['rss_first_mib']:.1f} → {row['rss_last_mib']:.1f} MiB over {orders:,} orders"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run at 32 conns")
    parser.add_argument("--duration-1", type=int, default=3, help="seconds per run at 1 conn")
    parser.add_argument("--connections", type=int, default=32, help="connections of the load runs")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load first")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s / 1 s, no warm-up")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    a = parser.parse_args(argv)
    if a.quick:
        a.rounds, a.duration, a.duration_1, a.warmup = 1, 2, 1, 0
    if min(a.rounds, a.duration, a.duration_1, a.connections) < 1:
        parser.error("--rounds, --duration, --duration-1 and --connections must be ≥ 1")
    return Options(a.rounds, a.duration, a.duration_1, a.connections, a.warmup, a.keep_tmp)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(ROOT))  # gateway.auth.hash_key for the configuration
    started = time.monotonic()
    try:
        with workdir(opts.keep_tmp) as tmp, contextlib.ExitStack() as stack:
            bench = Bench(opts, tmp, stack)
            bench.run()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; every process started was stopped", file=sys.stderr)
        return 130
    summary = summarise(bench)
    report: dict[str, Any] = {
        "machine": machine(),
        "options": asdict(opts),
        "body_bytes": bench.body_bytes,
        "targets": summary,
        "gateway": bench.gateway,
        "outbox": bench.outbox,
        "pdf": bench.pdf,
        "runs": [asdict(r) | {"rps": r.rps} for t in bench.targets.values() for r in t.runs],
    }
    report["ratios"] = {
        "gateway_vs_tuned": summary["gateway"]["rps"] / summary["tuned"]["rps"],
        "gateway_vs_naive": summary["gateway"]["rps"] / summary["naive"]["rps"],
        "outbox_vs_gateway": summary["gateway+outbox"]["rps"] / summary["gateway"]["rps"],
    }
    gateways = {"gateway": bench.gateway, "gateway+outbox": bench.outbox}
    report["failures"] = failures(summary, gateways, bench.pdf)
    report["wall_s"] = time.monotonic() - started
    markdown = render(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(markdown)
    print()
    print(markdown)
    print(
        f"wall time {report['wall_s']:.0f} s; wrote {RESULTS.relative_to(ROOT)}/latest.{{json,md}}"
    )
    for reason in report["failures"]:
        print(f"FAILED: {reason}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
