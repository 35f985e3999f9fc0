"""``python -m gateway``: the same as the ``gateway`` command.

``serve`` latches its stop and reload signals first (``signals.py``), before the imports and the
start-up that take a second: how the workers of ``serve --workers N`` are started.
"""

import sys

from gateway.signals import SignalLatch

latch = SignalLatch.install() if sys.argv[1:2] == ["serve"] else None

from gateway.cli import main  # noqa: E402 - after the latch, on purpose

sys.exit(main(latch=latch))
