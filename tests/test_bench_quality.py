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


def test_every_grid_setting_is_a_valid_training_config_that_differs_from_the_base_in_one_setting():
    """The grid runs for hours: a misspelt or unused field must fail here, not after the runs before it."""
    from bench_quality import BASE, GRID, LOSSES, run_settings, train_kwargs

    from students.train import TrainConfig

    base = train_kwargs(run_settings("grid/base")[0])
    assert base == {**BASE, **LOSSES["kd"]}
    for name in GRID:
        settings, seed = run_settings(f"grid/{name}#1")
        assert seed == 1 and settings["source"] == "teacher" and settings["loss"] == "kd"
        kw = train_kwargs(settings)
        TrainConfig(student="s", cache="c", out="o", **kw)  # every key is a field
        changed = {k for k in set(kw) | set(base) if kw.get(k) != base.get(k)} - {"lora_alpha"}
        assert len(changed) == {"base": 0, "warmup10pct": 2, "sft": 2}.get(name, 1), (name, changed)
    assert train_kwargs(run_settings("grid/warmup10pct")[0])["warmup_ratio"] == 0.1
    assert train_kwargs(run_settings("grid/ce0.5")[0])["ce_weight"] == 0.5
    sft = train_kwargs(run_settings("grid/sft")[0])
    assert (sft["kd_weight"], sft["ce_weight"]) == (0.0, 1.0)


def test_run_names_set_the_loss_codec_and_seed():
    from bench_quality import run_settings, train_kwargs

    assert run_settings("teacher/sft#1") == ({"source": "teacher", "loss": "sft", "codec": "topk64"}, 1)
    kw = train_kwargs(run_settings("human/kd+ce")[0])
    assert (kw["kd_weight"], kw["ce_weight"]) == (1.0, 0.5)
    assert run_settings("teacher/sampled12")[0]["codec"] == "sampled12"
    with pytest.raises(ValueError, match="unknown grid setting"):
        run_settings("grid/lr1")
