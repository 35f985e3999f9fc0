"""The ``gateway`` command's entry point (also ``python -m gateway``).

``serve`` latches its stop and reload signals first (``signals.py``), before the imports and the
start-up that take a second; then ``cli.main`` runs the command.
"""

import sys

from gateway.signals import SignalLatch


def main() -> int:
    latch = SignalLatch.install() if sys.argv[1:2] == ["serve"] else None
    from gateway.cli import main as run  # after the latch, on purpose: this import is the slow part

    return run(latch=latch)


if __name__ == "__main__":
    sys.exit(main())
