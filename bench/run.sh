#!/usr/bin/env bash
# `make bench`: install what the benchmark needs if it is missing, then run it.
#   wrk, nginx and redis-server from Debian (apt-get, as root or through sudo), orjson into the project's venv
#   (for the tuned hand-written proxy). Arguments go to bench/bench.py (--quick, --rounds, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "bench: no virtualenv at .venv; run 'make venv' (or 'make bench') first" >&2
    exit 2
fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have wrk || missing+=(wrk)
have nginx || missing+=(nginx)
have redis-server || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "bench: installing ${missing[*]} with apt-get" >&2
    # Debian's nginx package starts its default site on port 80 (all interfaces) when installed.
    # The benchmark runs its own nginx on loopback only, so keep the service from starting:
    # a temporary policy-rc.d (exit 101 = "action forbidden"), removed again right after.
    policy=/usr/sbin/policy-rc.d
    added_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        added_policy=1
    fi
    status=0
    { $SUDO apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
        status=$?
    [ -z "$added_policy" ] || $SUDO rm -f "$policy"
    [ "$status" -eq 0 ] || exit "$status"
fi

if ! "$PY" -c 'import orjson' 2>/dev/null; then
    echo "bench: installing orjson into .venv (the tuned proxy uses it)" >&2
    "$PY" -m pip install --quiet orjson
fi

exec "$PY" bench/bench.py "$@"
