"""The stage runner: markers skip finished stages, a changed config is refused, failures leave no marker."""

import json

import pytest

from distill.pipeline.config import RunConfig
from distill.errors import DistillError
from distill.pipeline.runner import Stage, run_stages


def make_stages(calls, fail_at=None):
    def work(name):
        def run(ctx):
            calls.append(name)
            if name == fail_at:
                raise RuntimeError("killed")
            (ctx.dir / f"{name}.out").write_text(name)
            return {"file": f"{name}.out"}
        return run

    return [
        Stage("one", ("run", "teacher"), work("one")),
        Stage("two", ("run", "teacher", "cache"), work("two")),
        Stage("three", ("run", "teacher", "cache", "train"), work("three"), enabled=lambda c: c.bench.enabled),
    ]


def test_second_run_skips_every_stage(tmp_path):
    cfg = RunConfig()
    cfg.run.dir = str(tmp_path / "run")
    calls = []
    ctx = run_stages(cfg, make_stages(calls), echo=lambda *_: None)
    assert calls == ["one", "two", "three"]
    assert not ctx.outputs["two"]["skipped"]
    ctx = run_stages(cfg, make_stages(calls), echo=lambda *_: None)
    assert calls == ["one", "two", "three"]
    assert all(out["skipped"] for out in ctx.outputs.values())
    assert json.loads((tmp_path / "run" / "stages" / "two.json").read_text())["outputs"] == {"file": "two.out"}


def test_interrupted_stage_runs_again_and_finished_ones_do_not(tmp_path):
    cfg = RunConfig()
    cfg.run.dir = str(tmp_path / "run")
    calls = []
    with pytest.raises(RuntimeError):
        run_stages(cfg, make_stages(calls, fail_at="two"), echo=lambda *_: None)
    assert not (tmp_path / "run" / "stages" / "two.json").exists()
    run_stages(cfg, make_stages(calls), echo=lambda *_: None)
    assert calls == ["one", "two", "two", "three"]


def test_changed_settings_under_a_finished_stage_are_refused(tmp_path):
    cfg = RunConfig()
    cfg.run.dir = str(tmp_path / "run")
    run_stages(cfg, make_stages([]), echo=lambda *_: None)
    cfg.cache.top_k = 3
    with pytest.raises(DistillError, match="stage 'two'"):
        run_stages(cfg, make_stages([]), echo=lambda *_: None)


def test_disabled_stage_is_not_run(tmp_path):
    cfg = RunConfig()
    cfg.run.dir = str(tmp_path / "run")
    cfg.bench.enabled = False
    calls = []
    run_stages(cfg, make_stages(calls), echo=lambda *_: None)
    assert calls == ["one", "two"]


def test_remaining_time_scales_the_expected_times_by_the_pace_so_far():
    from distill.pipeline.runner import remaining_seconds

    expected = {"one": 10.0, "two": 20.0, "three": 30.0}
    assert remaining_seconds(expected, [], ["one", "two", "three"]) == 60.0
    assert remaining_seconds(expected, [("one", 20.0)], ["two", "three"]) == 100.0  # twice as slow here
    assert remaining_seconds(expected, [("one", 1.0), ("two", 2.0)], ["three"]) == 7.5  # 10x faster: capped at 4x
    assert remaining_seconds(expected, [("one", 5.0)], []) == 0.0


def test_each_stage_line_says_how_long_the_rest_takes(tmp_path):
    cfg = RunConfig()
    cfg.run.dir = str(tmp_path / "run")
    lines = []
    run_stages(cfg, make_stages([]), echo=lines.append, expected={"one": 1.0, "two": 60.0, "three": 120.0})
    done = [line for line in lines if "done in" in line]
    assert len(done) == 3 and "left" in done[0] and "left" in done[1] and "left" not in done[2]
    marker = json.loads((tmp_path / "run" / "stages" / "two.json").read_text())
    assert marker["cpu_s"] >= 0 and marker["wall_s"] >= 0  # CPU time beside wall time: shared machines
    lines.clear()
    run_stages(cfg, make_stages([]), echo=lines.append, expected={"one": 1.0, "two": 60.0, "three": 120.0})
    assert lines[0] == "[1/3] one: complete, skipped; about 3 min 00 s left"


def test_expected_stage_times_scale_with_the_work():
    from distill.pipeline.commands import demo_config
    from distill.pipeline.stages import REFERENCE_SECONDS, expected_seconds

    full = expected_seconds(demo_config("x"))
    assert full == pytest.approx(REFERENCE_SECONDS)
    quick = expected_seconds(demo_config("x", quick=True))
    assert quick["generate"] < full["generate"] / 10 and quick["bench"] < full["bench"] / 5
    assert quick["teacher"] == full["teacher"]  # the GGUF import does not shrink
