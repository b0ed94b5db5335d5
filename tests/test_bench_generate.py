"""benchmarks/bench_generate.py's full-batch decode rate: which steps it counts (the benchmark itself
needs the real model and minutes of CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_full_batch_rate_counts_only_steps_that_ran_every_slot():
    from bench_generate import _full_batch_rate

    # (clock, rows): a prefill (0), three full steps of 0.5 s, a prefill refill inside the third step's
    # interval, then the drain at 3 and 1 rows; the end mark closes the last step.
    marks = [(0.0, 0), (1.0, 4), (1.5, 4), (2.0, 4), (2.4, 0), (3.0, 3), (3.1, 1), (3.15, 0)]
    # full steps start at 1.0, 1.5 and 2.0 and last until the next forward: 0.5, 0.5 and 0.4 s
    assert _full_batch_rate(marks, 4) == pytest.approx(4 / 0.5)
    assert _full_batch_rate(marks, 3) == pytest.approx(3 / 0.1)
    assert _full_batch_rate(marks, 8) == 0.0  # no step ran 8 rows
    assert _full_batch_rate([], 4) == 0.0
