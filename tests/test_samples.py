"""samples/ is the project's copy of the partner samples in ../shared/samples (the steering repo's).

The demo and the tests use the copy, so that a clone works on its own; this keeps it in step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / "samples"
SHARED = ROOT.parent / "shared" / "samples"


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/samples beside this checkout")
def test_samples_match_the_shared_ones() -> None:
    shared = {p.name: p.read_bytes() for p in SHARED.iterdir() if p.is_file()}
    ours = {p.name: p.read_bytes() for p in OURS.iterdir() if p.is_file()}

    assert ours == shared
