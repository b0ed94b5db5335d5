"""On-policy distillation in rounds (`[onpolicy]`), end to end on tiny models: two rounds after the
train stage, each sampling the student, caching the teacher on those samples and training from the
previous round's adapters; a run killed after round 1 reruns round 2 only; export takes the last round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.pipeline.commands import run_pipeline
from distill.pipeline.config import config_from_dict, load_config
from distill.pipeline.onpolicy import mixed_records
from teachers.generate import read_traces

REPO = Path(__file__).resolve().parents[1]


def onpolicy_config(tmp_path: Path, teacher: Path) -> Path:
    path = tmp_path / "onpolicy.toml"
    path.write_text(f"""
[run]
dir = "run"
[teacher]
model = "{teacher}"
[data]
source = "synthetic"
limit = 2
eval_limit = 2
[generate]
samples = 1
max_new_tokens = 6
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
steps = 1
batch_size = 4
eval_every = 0
eval_fraction = 0.2
save_every = 0
[onpolicy]
rounds = 2
samples = 2
mix = 0.5
steps = 1
[export]
format = "merged"
dtype = "fp32"
[bench]
enabled = false
""")
    return path


def _adapters(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def test_two_rounds_resume_after_kill_and_export_the_last(tmp_path, tiny_model_dir, capsys):
    config = onpolicy_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    round1, round2 = run / "onpolicy" / "round-1", run / "onpolicy" / "round-2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only spin on a shared CPU
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "run", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (round1 / "done.json").exists() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (round1 / "done.json").is_file(), "the run never finished round 1"
    assert not (run / "stages" / "onpolicy.json").exists(), "killed too late: round 2 had finished"
    round1_mtime = (round1 / "train" / "final" / "adapter_model.safetensors").stat().st_mtime_ns

    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = run_pipeline(load_config(config))
    finally:
        torch.set_num_threads(threads)
    said = capsys.readouterr().out
    assert "round 1/2: complete, skipped" in said and "round 2/2: student samples" in said
    assert (round1 / "train" / "final" / "adapter_model.safetensors").stat().st_mtime_ns == round1_mtime

    # each round: the student's own samples (2 per prompt), scored by the teacher, plus teacher traces
    for rdir in (round1, round2):
        samples = read_traces(rdir / "samples.jsonl")
        assert len(samples) == 2 * 2
        assert all(s["teacher"]["name_or_path"].endswith("final") for s in samples)  # sampled by the student
        records = [json.loads(line) for line in (rdir / "records.jsonl").read_text().splitlines()]
        assert sum(r["id"].startswith("teacher-") for r in records) == 2  # mix 0.5, but only 2 teacher traces kept
    # round 2 continued round 1's adapters, which continued the train stage's; all three differ
    run2 = json.loads((round2 / "train" / "run.json").read_text())
    assert run2["config"]["init_adapter"] == str(round1 / "train" / "final")
    assert json.loads((round1 / "train" / "run.json").read_text())["config"]["init_adapter"] == str(run / "train" / "final")
    a0, a1, a2 = _adapters(run / "train"), _adapters(round1 / "train"), _adapters(round2 / "train")
    assert a0.keys() == a1.keys() == a2.keys()
    assert any(not (a0[k] == a1[k]).all() for k in a0) and any(not (a1[k] == a2[k]).all() for k in a1)
    outputs = ctx["stages"]
    assert [r["round"] for r in outputs["onpolicy"]["rounds"]] == [1, 2]
    assert all(r["teacher_tokens_scored"] > 0 for r in outputs["onpolicy"]["rounds"])
    assert outputs["export"]["summary"]["run_dir"] == str(round2 / "train")  # export takes the last round


def test_onpolicy_off_leaves_stage_hashes_unchanged(tmp_path):
    off = config_from_dict({"onpolicy": {"rounds": 0, "mix": 0.3}}, base_dir=tmp_path)
    plain = config_from_dict({}, base_dir=tmp_path)
    assert off.section_hash("train", "onpolicy", "export") == plain.section_hash("train", "export")
    on = config_from_dict({"onpolicy": {"rounds": 1}}, base_dir=tmp_path)
    assert on.section_hash("train", "onpolicy", "export") != plain.section_hash("train", "export")


def test_mixed_records_share_and_determinism():
    samples = [{"id": f"s{i}"} for i in range(6)]
    kept = [{"id": f"t{i}"} for i in range(10)]
    mixed = mixed_records(samples, kept, mix=0.25, seed=3)
    assert len(mixed) == 8 and mixed[:6] == samples  # 2 / 8 = 0.25 teacher traces
    assert mixed == mixed_records(samples, kept, mix=0.25, seed=3)
    assert mixed_records(samples, kept, mix=0.0, seed=3) == samples
    assert len(mixed_records(samples, kept[:1], mix=0.9, seed=3)) == 7  # no more than there are


def test_train_init_adapter_continues_the_given_adapters(kd_pair, tmp_path):
    """`--init-adapter`: a run starts from saved adapters (at lr ~0 it ends where they were), and adapters
    of another LoRA shape are one error line."""
    import pytest

    from distill.errors import DistillError
    from students.train import TrainConfig, train

    _, student, cache = kd_pair
    base = dict(student=str(student), cache=str(cache), quant="none", lora_r=4, lora_alpha=8, batch_size=4,
                eval_every=0, save_every=0, gradient_checkpointing=False, progress=False)
    train(TrainConfig(out=tmp_path / "a", steps=2, lr=1e-2, warmup_steps=0, **base))
    train(TrainConfig(out=tmp_path / "b", steps=1, lr=1e-12, warmup_steps=0, init_adapter=str(tmp_path / "a" / "final"),
                      **base))
    a, b = _adapters(tmp_path / "a"), _adapters(tmp_path / "b")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # trained: not the zero init
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    with pytest.raises(DistillError, match="does not fit this student"):
        train(TrainConfig(out=tmp_path / "c", steps=1, init_adapter=str(tmp_path / "a" / "final"),
                          **{**base, "lora_r": 8}))
