"""On-policy rounds under `accelerate launch --multi_gpu --num_processes 2` (a gloo group on the CPU) give
what one process gives, from the same finished train stage.

Why they should: each pass of a round is a stage that already splits its work by rank and is checked on
2 processes (trace sampling seeds every (problem, sample) row by itself, so the rows a rank draws do not
depend on which rank draws them; the cache deals shards; training all-reduces gradients). A round only
chains them, with the main process writing the round's records and its done marker. So the student's
samples, the round's records and the teacher's cache must be byte for byte the same, and the training
the same up to float summation order.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import torch

from test_scale_out import ROOT, _env, _no_leftovers, _sharp_teacher, assert_same_samples, launch_script
from test_train_multiprocess import _assert_same_training, _assert_written_once

# The run folder is relative ("run" under the working directory), so that a copy of a finished run in
# another folder keeps the stage hashes (run.dir is part of them) and only the on-policy stage runs.
DRIVER = """
import os, sys
from pathlib import Path
from distill.pipeline.config import load_config
from distill.pipeline.runner import run_stages
from distill.pipeline.stages import STAGES

config = load_config(sys.argv[1])
os.chdir(sys.argv[2])
config.run.dir = Path("run")
run_stages(config, [s for s in STAGES if s.name in sys.argv[3].split(",")])
"""
UPSTREAM = "teacher,generate,filter,cache,student,train"


def _config(tmp_path: Path, teacher: Path) -> Path:
    path = tmp_path / "onpolicy.toml"
    path.write_text(f"""
[teacher]
model = "{teacher}"
[data]
source = "synthetic"
limit = 3
eval_limit = 2
[generate]
samples = 1
max_new_tokens = 8
batch_size = 4
[filter]
keep = "all"
[cache]
top_k = 8
[student]
keep_layers = "first:1"
[train]
quant = "none"
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
steps = 1
batch_size = 2
eval_every = 0
eval_fraction = 0.25
save_every = 0
warmup_steps = 1
[onpolicy]
rounds = 2
samples = 3
mix = 0.25
max_new_tokens = 10
steps = 5
""")
    return path


def _same_file(a: Path, b: Path, one: Path, two: Path, *, probe: bool) -> bool:
    """The same bytes but for the run folder (the sampler's adapter path, recorded with each trace) and,
    unless `probe`, the sampler's weights probe: a hash of adapters that are equal only up to float rounding
    after a round trained on 2 processes, so from round 2 on it differs while every sampled token is equal,
    and the recorded log-probabilities agree to float rounding (1e-5), not to the last printed digit."""
    text_a, text_b = a.read_text(), b.read_text().replace(str(two), str(one))
    if probe:
        return text_a == text_b
    rows_a, rows_b = ([json.loads(line) for line in t.splitlines()] for t in (text_a, text_b))
    for row in rows_a + rows_b:
        row.get("teacher", {}).pop("weights_probe", None)
    return len(rows_a) == len(rows_b) and all(_close(x, y) for x, y in zip(rows_a, rows_b))


def _close(x, y) -> bool:
    """Equal JSON values, floats to a relative and absolute 1e-5 (equal strings, ids and tokens exactly)."""
    if isinstance(x, float) or isinstance(y, float):
        return isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y))
    return x == y


def test_onpolicy_rounds_on_two_processes_equal_one(tmp_path, monkeypatch):
    """Two rounds on 2 processes, from a copy of the 1-process run's finished train stage: the same student
    samples, records and teacher caches as 1 process, the same training, one writer per file."""
    from distill.pipeline.config import load_config
    from distill.pipeline.runner import run_stages
    from distill.pipeline.stages import STAGES

    config = _config(tmp_path, _sharp_teacher(tmp_path / "sharp-teacher"))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    # one process: here (the imports are paid once), on one thread like the launched processes
    settings = load_config(config)
    settings.run.dir = Path("run")
    monkeypatch.chdir(one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stages(settings, [s for s in STAGES if s.name in (UPSTREAM + ",onpolicy").split(",")], echo=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(one / "run", two / "run", ignore=shutil.ignore_patterns("onpolicy"))
    (two / "run" / "stages" / "onpolicy.json").unlink()

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(launch_script(2, driver, str(config), str(two), UPSTREAM + ",onpolicy"), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("complete, skipped") == 6  # only the on-policy stage ran, on both processes
    assert proc.stdout.count("round 2/2: student trains") == 1  # one process speaks

    for r in (1, 2):
        a, b = one / "run" / "onpolicy" / f"round-{r}", two / "run" / "onpolicy" / f"round-{r}"
        for name in ("samples.jsonl", "student.jsonl", "records.jsonl"):
            assert _same_file(a / name, b / name, one, two, probe=r == 1), (r, name)
        assert not list(b.glob("*.part-*"))
        records = [json.loads(line) for line in (b / "records.jsonl").read_text().splitlines()]
        assert len(records) == 3 * 3 + 3  # 9 student samples, then 3 teacher traces for the 0.25 share
        assert_same_samples(b / "cache", a / "cache")
        assert json.loads((b / "cache" / "manifest.json").read_text())["build"]["processes"] == 2
        _no_leftovers(b / "cache")
        _assert_written_once(b / "train")
        _assert_same_training(a / "train", b / "train")
        done_a, done_b = (json.loads((d / "done.json").read_text()) for d in (a, b))
        assert done_b["hash"] == done_a["hash"]
        for key in ("student_accuracy", "student_samples", "teacher_traces", "teacher_tokens_scored", "steps"):
            assert done_b["summary"][key] == done_a["summary"][key], key
    # round 2 started from round 1's adapters (a relative run folder: the same string on both)
    run2 = json.loads((two / "run" / "onpolicy" / "round-2" / "train" / "run.json").read_text())
    assert run2["config"]["init_adapter"] == str(Path("run") / "onpolicy" / "round-1" / "train" / "final")
