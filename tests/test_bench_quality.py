"""benchmarks/bench_quality.py helpers that its numbers rest on (the benchmark itself needs the real pair)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_wilson_interval_matches_known_values():
    from bench_quality import wilson

    # Reference values of the Wilson score interval (z = 1.96).
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 16) == pytest.approx((0.0, 0.1936), abs=1e-4)
    assert wilson(16, 16) == pytest.approx((0.8064, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_human_solutions_lose_the_calculator_annotations():
    from bench_quality import _human

    rec = _human({"question": "Q?", "answer": "She sells 16 - 3 = <<16-3=13>>13 eggs.\n#### 13"})
    assert rec == {"prompt": "Q?", "completion": "She sells 16 - 3 = 13 eggs.\n#### 13"}
