"""The memory planner: exact storage formulas against bitsandbytes, the largest-batch search, the
`distill plan` CLI, `train --batch-tokens auto`, and the whole plan against a measured CPU step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.plan import (ModelShape, gpu_budget, largest_batch, parse_size, plan_inference, plan_training,
                          quantized_linear_bytes)

REPO = Path(__file__).resolve().parents[1]
QWEN_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True}


def test_nf4_and_int8_storage_is_what_bitsandbytes_stores():
    import torch
    import bitsandbytes.functional as F

    w = torch.randn(768, 256)
    packed, st = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    stored = sum(t.numel() * t.element_size() for t in (packed, st.absmax, st.state2.absmax, st.state2.code, st.code, st.offset))
    assert quantized_linear_bytes(w.numel(), 768, "nf4", 2) == stored
    assert quantized_linear_bytes(w.numel(), 768, "int8", 2) == w.numel() + 768 * 4
    assert quantized_linear_bytes(w.numel(), 768, "none", 2) == 2 * w.numel()


def test_shape_counts_a_real_config():
    s = ModelShape.from_config(QWEN_1_5B)
    # Qwen2.5-1.5B has 1.54B parameters (tied embeddings, q/k/v biases)
    assert abs(s.params - 1_543_714_304) < 1e6
    assert s.kv_dim == 256 and s.tied and s.attention_bias


def test_parts_scale_as_documented():
    s = ModelShape.from_config(QWEN_1_5B)
    one = plan_training(s, context=4096, batch_tokens=4096)
    two = plan_training(s, context=4096, batch_tokens=8192)
    assert one.part("base weights (linear layers)") == two.part("base weights (linear layers)")
    assert two.part("activations") > 1.9 * one.part("activations") - 1  # linear in the batch
    ckpt_off = plan_training(s, context=4096, gradient_checkpointing=False)
    assert ckpt_off.part("activations") > 5 * one.part("activations")
    for compute, dropout in (("bf16", 0.05), ("fp32", 0.05), ("fp32", 0.0)):  # lean layers keep less, never more
        kw = dict(context=4096, compute=compute, lora_dropout=dropout)
        lean, every3 = plan_training(s, checkpoint_every=0, lean=True, **kw), plan_training(s, checkpoint_every=3, **kw)
        assert plan_training(s, **kw).part("activations") < lean.part("activations") < \
            plan_training(s, gradient_checkpointing=False, **kw).part("activations")
        assert plan_training(s, checkpoint_every=3, lean=True, **kw).part("activations") < every3.part("activations")
    assert plan_training(s, optimizer="adamw").part("optimizer states") == 8 * one.part("LoRA adapters") // 4
    inf = {p.name: p.bytes for p in plan_inference(s, context=4096)}
    assert inf["KV cache"] == 2 * 28 * 2 * 128 * 4096 * 2  # 2 x layers x kv heads x head_dim x tokens x bf16


def test_largest_batch_is_the_largest_that_fits():
    s = ModelShape.from_config(QWEN_1_5B)
    budget = gpu_budget(parse_size("24GB"))
    best = largest_batch(s, budget, context=4096)
    n = best.settings["sequences"]
    assert best.total <= budget < plan_training(s, context=4096, batch_tokens=(n + 1) * 4096).total
    assert largest_batch(s, gpu_budget(parse_size("80GB")), context=4096).settings["sequences"] > n
    assert largest_batch(s, gpu_budget(parse_size("2GB")), context=4096) is None


def test_sizes_and_refusals():
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24") == 24 * 2**30
    assert parse_size("512MB") == 512 * 2**20
    with pytest.raises(DistillError, match="24 gigs"):
        parse_size("24 gigs")
    with pytest.raises(DistillError, match="mixture of experts"):
        ModelShape.from_config(QWEN_1_5B | {"num_experts": 8})
    with pytest.raises(DistillError, match="needs hidden_size"):
        ModelShape.from_config({"model_type": "x"})
    with pytest.raises(DistillError, match="--quant"):
        plan_training(ModelShape.from_config(QWEN_1_5B), quant="nf3")


def test_plan_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1_5B))
    run = lambda *a: subprocess.run([sys.executable, "-c", "import cli; cli.main()", "plan", *a],  # noqa: E731
                                    cwd=REPO, capture_output=True, text=True)
    out = run("--student", str(tmp_path), "--quant", "nf4", "--lora-r", "16", "--context", "4096", "--gpu", "24GB")
    assert out.returncode == 0, out.stderr
    for part in ("base weights", "LoRA adapters", "optimizer states", "activations", "chunked loss", "cache batch",
                 "KV cache", "largest batch:"):
        assert part in out.stdout
    js = json.loads(run("--student", str(tmp_path / "config.json"), "--json", "--gpu", "24GB").stdout)
    assert js["gpu"]["largest_batch_tokens"] % 4096 == 0 and js["training"]["total"] > 0
    bad = run("--student", str(tmp_path / "missing"))
    assert bad.returncode == 1 and bad.stderr.startswith("error: student") and "does not exist" in bad.stderr


def test_train_batch_tokens_auto(kd_pair, tmp_path, monkeypatch):
    from students.train import TrainConfig, train

    _, student, cache = kd_pair
    cfg = TrainConfig(student=str(student), cache=str(cache), out=str(tmp_path / "run"), batch_tokens="auto", steps=2,
                      lora_r=4, lora_alpha=8, eval_every=0, save_every=1, progress=False)
    summary = train(cfg)
    plan = summary["batch_plan"]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["batch_plan"] == plan and record["config"]["batch_tokens"] == "auto"
    assert plan["batch_tokens"] == plan["sequences"] * plan["context"] and plan["device"] == "cpu"
    assert plan["planned_bytes"] <= plan["budget_bytes"] and "of the" in plan["budget"]
    # A resumed run keeps the stored choice (its micro-batches must replay), whatever memory is free
    # now: with 1 byte "available", planning again would refuse.
    import students.auto_batch as ab

    (tmp_path / "run" / "final" / "summary.json").unlink()  # as if killed before the end
    monkeypatch.setattr(ab, "available_memory", lambda device: (1, "1 byte"))
    again = train(TrainConfig(**(cfg.to_dict() | {"resume": True})))
    assert again["batch_plan"] == plan
    with pytest.raises(DistillError, match="one sequence of .* needs .* but only 1 B|only 0.0 MiB"):
        train(TrainConfig(**(cfg.to_dict() | {"out": str(tmp_path / "run3")})))
    with pytest.raises(DistillError, match="number of tokens or auto"):
        train(TrainConfig(**(cfg.to_dict() | {"batch_tokens": "lots", "out": str(tmp_path / "run2")})))


def test_plan_matches_a_measured_cpu_step(tmp_path):
    """The whole plan (weights, adapters, AdamW, activations, loss, batch) against the peak resident
    memory of a real NF4 + LoRA r=16 step in a fresh process (benchmarks/bench_plan.py), within 20%.
    A random llama of 8 layers, hidden 256, vocab 16k, 4 x 128 tokens: ~250 MiB, large enough that
    RSS noise (a few MiB) does not matter; the tiny test students (~5 MiB) would measure noise."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_plan import compare, make_student

    student = make_student(tmp_path / "mid", 256, 8, 8, 4, 768, 16384)
    for ckpt in (False, True):
        res = compare(str(student), context=128, sequences=4, checkpointing=ckpt)
        assert abs(res["error_pct"]) <= 20, res
