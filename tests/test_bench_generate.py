"""benchmarks/bench_generate.py: which steps its full-batch decode rate counts, and that its compiled
variant really compiles (the benchmark itself needs the real model and minutes of CPU)."""

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


def test_compiled_generate_options_compile_on_a_cpu_and_change_no_token(tiny_tok):
    """The `--compiled` variant must really run transformers' compiled decoding on a CPU (transformers
    compiles on accelerators only unless told), and decode what eager decoding decodes."""
    import torch
    from bench_generate import _compiled_generate_options
    from helpers import tiny_llama
    from torch._dynamo.utils import counters

    model = tiny_llama(tiny_tok).eval()
    enc = tiny_tok(["3 + 4 =", "12 + 30 ="], return_tensors="pt", padding=True)
    options = dict(do_sample=False, max_new_tokens=4, pad_token_id=tiny_tok.pad_token_id)
    with torch.inference_mode():
        eager = model.generate(**enc, **options, cache_implementation="static", disable_compile=True)
        torch._dynamo.reset()
        counters.clear()
        compiled = model.generate(**enc, **options, **_compiled_generate_options())
    assert counters["stats"]["unique_graphs"] >= 1  # a decoding step went through dynamo
    assert torch.equal(eager, compiled)
