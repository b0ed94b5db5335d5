"""`distill rl`: GRPO by TRL's GRPOTrainer on a tiny student, our verifiers as rewards; the run it
saves is continued from a training run, logs its rewards, changes the adapters, and exports.

Needs the `rl` extra (TRL), which the `test` extra includes. A tiny random student never states the
gold answer, so the accuracy check here is a fixed function of the completion text (as in
tests/test_star.py): rewards then vary within a group and GRPO has a gradient to follow.
"""

from __future__ import annotations

import json
import zlib

import pytest

pytest.importorskip("trl", reason="needs the rl extra: pip install 'distill[rl]'")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import cli  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from students.export import export_run  # noqa: E402
from students.rl import RLConfig, read_rewards, rewards, train_rl  # noqa: E402
from students.train import TrainConfig, train  # noqa: E402


def verify(completion: str, gold: str) -> bool:
    return zlib.crc32(f"{gold}|{completion}".encode()) % 2 == 0


@pytest.fixture(scope="module")
def kd_run(kd_pair, tmp_path_factory):
    """A one-step `distill train` run of the tiny NF4 student (the start GRPO continues)."""
    _, student, cache = kd_pair
    out = tmp_path_factory.mktemp("rl") / "kd"
    train(TrainConfig(student=str(student), cache=str(cache), out=out, quant="nf4", lora_r=4, lora_alpha=8, steps=1,
                      batch_size=4, eval_every=0, save_every=0, gradient_checkpointing=False, progress=False))
    return out


def test_grpo_from_a_training_run_logs_rewards_changes_adapters_and_exports(kd_run, tmp_path):
    out = tmp_path / "grpo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_rl(RLConfig(start=str(kd_run), out=out, data="synthetic:4:0", steps=3, num_generations=4,
                                    prompts_per_step=1, max_new_tokens=8, lr=5e-3, progress=False), verify=verify)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 3
    logged = read_rewards(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["format"] == 0.0 for r in logged)  # a random model never closes </think>
    assert any(0.0 < r["accuracy"] < 1.0 for r in logged)  # the group's rewards differ: there is an advantage
    run = json.loads((out / "run.json").read_text())
    assert run["student"] == json.loads((kd_run / "run.json").read_text())["student"]  # NF4 base + LoRA kept
    start = load_file(str(kd_run / "final" / "adapter_model.safetensors"))
    end = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    exported = export_run(out, tmp_path / "export", dtype="fp32")  # export takes it like any run
    assert "config.json" in exported["files"]

    # `distill bench` takes the GRPO run's final/ as it takes a training run's (adapters on the NF4 base
    # they trained on) and the export as a model directory, beside the run GRPO started from
    from distill.bench.loading import load_for_bench

    loaded = load_for_bench("grpo", str(out / "final"))
    assert loaded.source == "adapter" and loaded.base_path == run["student"]["path"]
    weights = {k: v for k, v in loaded.model.state_dict().items() if "lora_" in k}
    assert len(weights) == len(end)
    for key, value in end.items():  # the bench holds GRPO's adapters, not the start's
        match = [w for k, w in weights.items() if k.replace(".default", "").endswith(key.removeprefix("base_model.model."))]
        assert len(match) == 1 and torch.equal(match[0].float(), value.float()), key
    del loaded
    bench = tmp_path / "bench"
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--model", f"start={kd_run / 'final'}", "--model", f"grpo={out / 'final'}",
                  "--model", f"export={tmp_path / 'export'}", "--task", "synthetic", "--limit", "2", "--samples", "2",
                  "--max-new-tokens", "8", "--batch-size", "4", "--out", str(bench), "--no-progress"])
    assert not exc.value.code
    results = json.loads((bench / "results.json").read_text())
    models = {m["name"]: m for m in results["models"]}
    assert list(models) == ["start", "grpo", "export"]
    assert models["grpo"]["source"] == "adapter" and models["export"]["source"] == "hf-dir"
    for m in models.values():
        assert m["accuracy"]["greedy"]["n"] == 2 and m["cost"]["generated_tokens"] > 0


def test_reward_functions_are_our_verifiers():
    accuracy, fmt = rewards()
    good = "<think>2 + 2 = 4</think> The answer is 4."
    assert accuracy([good, "The answer is 5."], gold=["4", "4"]) == [1.0, 0.0]
    assert fmt([good, "4"]) == [1.0, 0.0]


def test_bad_start_is_one_line(tmp_path, capsys):
    with pytest.raises(DistillError, match="neither a training run"):
        train_rl(RLConfig(start=str(tmp_path), out=tmp_path / "o"))
    with pytest.raises(SystemExit):
        cli.main(["rl", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip().startswith("error: start ")
