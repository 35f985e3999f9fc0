"""`make demo`: the Manager sandbox and the gateway on loopback, with curl lines to paste.

Starts both as child processes, waits until the gateway's /readyz answers, prints one curl line per
sample, and stops both (by PID) on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_ORG_KEY = "demo-org-key-not-a-secret"  # the sandbox's documented demo key
# Printed in the guide so `gateway outbox list` can be pasted; made fresh for every run.
DEMO_OUTBOX_KEY = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")
PARTNER_KEYS = {"telemed-one": "demo-partner-key", "drx": "demo-drx-key"}
SAMPLES = [
    ("flat-payload.json", "telemed-one", "Manager's payload fields at top level"),
    ("envelope.json", "telemed-one", "Manager's own envelope"),
    ("qty-style.json", "telemed-one", "qty and numbers as strings, normalized"),
    ("prescription-inline.json", "telemed-one", "prescription only, inline base64"),
    ("nested-partner.json", "drx", "a partner's own shape, mapped by its profile"),
]


def wait_until_ready(url: str, process: subprocess.Popen[bytes], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: a process exited early (code {process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo: {url} did not answer within {seconds:.0f} s")


def print_guide(port: int, sandbox_port: int) -> None:
    order_url = f"http://127.0.0.1:{port}/api/v1/external-order"
    print("\nThe gateway is ready. Paste any of these into another terminal:\n")
    for sample, partner, what in SAMPLES:
        print(f"# {what} (partner {partner})")
        print(
            f"curl -s {order_url} -H 'apikey: {PARTNER_KEYS[partner]}' "
            f"-H 'Content-Type: application/json' -d @samples/{sample}; echo\n"
        )
    pdf_url = f"http://127.0.0.1:{sandbox_port}/_sandbox/prescription.pdf"
    print("# a prescription URL: the gateway fetches the PDF and sends it as base64")
    print(
        f"curl -s {order_url} -H 'X-API-Key: demo-partner-key' -H 'Content-Type: application/json' "
        f"""-d '{{"customer_name": "Erika Musterfrau", "prescription_url": "{pdf_url}"}}'; echo\n"""
    )
    print("# an error: the contract's JSON error, with a request id")
    print(
        f"curl -s {order_url} -H 'apikey: demo-partner-key' -H 'Content-Type: application/json' "
        """-d '{"items": [{"qty": 0}]}'; echo\n"""
    )
    print("# what Manager (the sandbox) received, and the gateway's metrics")
    print(f"curl -s http://127.0.0.1:{sandbox_port}/_sandbox/order-requests; echo")
    print("curl -s http://127.0.0.1:9091/metrics | grep ^gateway_\n")
    print_outage_guide(order_url, sandbox_port)
    print("# the operator console in a browser (read-only: demo.toml sets no admin token)")
    print("#   http://127.0.0.1:9091/\n")
    print("Ctrl-C stops both.\n")


def print_outage_guide(order_url: str, sandbox_port: int) -> None:
    """Store and forward: an order survives a Manager outage."""
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    order = (
        '{"external_reference": "OUTAGE-1", "customer_name": "Erika Musterfrau", '
        '"items": [{"name": "Ibuprofen 400", "quantity": 1}]}'
    )
    status = f"curl -s {order_url}/OUTAGE-1 -H 'apikey: demo-partner-key'; echo"
    print("# --- store and forward: an order survives a Manager outage ---")
    print("# 1. Manager goes down (the sandbox answers 503 to every call)")
    print(f"curl -s -X POST {sandbox}/_sandbox/outage; echo")
    print("# 2. an order meanwhile: 202 queued, with a Location (the gateway has stored it)")
    print(
        f"curl -si {order_url} -H 'apikey: demo-partner-key' -H 'Content-Type: application/json' "
        f"-d '{order}'; echo"
    )
    print("# 3. its status: queued, with attempts and the last error")
    print(status)
    print("# 4. Manager recovers; a few seconds later the deliverer has sent it: delivered")
    print(f"curl -s -X DELETE {sandbox}/_sandbox/outage; sleep 3")
    print(status)
    print("# what the outbox holds (no customer data; bodies are encrypted)")
    print(
        f"DEMO_ORG_KEY={DEMO_ORG_KEY} OUTBOX_KEY={DEMO_OUTBOX_KEY} "
        ".venv/bin/gateway outbox list --config config/demo.toml\n"
    )


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)  # stopped by a supervisor: still stop both children
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config/demo.toml")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--sandbox-port", type=int, default=8090)
    args = parser.parse_args()
    # A fresh outbox each run: its file is sealed with this run's key.
    outbox = ROOT / ".demo"
    outbox.mkdir(exist_ok=True)
    for stale in outbox.glob("outbox.db*"):
        stale.unlink()
    env = {**os.environ, "DEMO_ORG_KEY": DEMO_ORG_KEY, "OUTBOX_KEY": DEMO_OUTBOX_KEY}
    gateway_cmd = [sys.executable, "-m", "gateway"]
    sandbox = subprocess.Popen(
        [*gateway_cmd, "sandbox", "--port", str(args.sandbox_port)], cwd=ROOT
    )
    processes = [sandbox]
    try:
        wait_until_ready(f"http://127.0.0.1:{args.sandbox_port}/_sandbox/order-requests", sandbox)
        serve = [*gateway_cmd, "serve", "--config", args.config, "--port", str(args.port)]
        gateway = subprocess.Popen(serve, cwd=ROOT, env=env)
        processes.append(gateway)
        wait_until_ready("http://127.0.0.1:9091/readyz", gateway)
        print_guide(args.port, args.sandbox_port)
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
