"""Trainer: gradient-accumulation equivalence, exact resume after SIGKILL, run directory, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.errors import DistillError
from students.train import TrainConfig, make_micro_batches, read_metrics, train

REPO = Path(__file__).resolve().parents[1]


def _cfg(kd_pair, out, **kw) -> TrainConfig:
    _, student, cache = kd_pair
    base = dict(student=str(student), cache=str(cache), out=str(out), quant="none", lora_r=4, lora_alpha=8,
                lora_dropout=0.0, lr=5e-3, batch_size=4, steps=3, eval_every=0, save_every=0,
                eval_fraction=0.2, progress=False, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _train_losses(run_dir: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["kd"], m["ce"]) for m in read_metrics(run_dir) if m["kind"] == "train"]


def test_grad_accum_equals_one_big_batch(kd_pair, tmp_path):
    """2 micro-batches of 2 (different lengths) = 1 batch of 4: same losses, same trained adapters."""
    big = train(_cfg(kd_pair, tmp_path / "big", batch_size=4, grad_accum=1))
    acc = train(_cfg(kd_pair, tmp_path / "acc", batch_size=2, grad_accum=2))
    assert big["steps"] == acc["steps"] == 3
    lb, la = _train_losses(tmp_path / "big"), _train_losses(tmp_path / "acc")
    for (s1, l1, k1, c1), (s2, l2, k2, c2) in zip(lb, la):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-7) and c1 == pytest.approx(c2, rel=1e-5)
    wb, wa = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    moved = 0
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)
        moved += int(not torch.allclose(wb[name], torch.zeros_like(wb[name])))
    assert moved > 0  # the adapters did train (B matrices leave zero)
    # The per-micro-batch mean (the shipped bug) would differ: micro-batches have unequal valid tokens.
    recs = [m for m in read_metrics(tmp_path / "acc") if m["kind"] == "train"]
    assert all(r["valid_tokens"] > 0 for r in recs)


def test_micro_batches_are_deterministic_and_token_bounded():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30]
    a = make_micro_batches(range(8), lengths, epoch=1, seed=3, batch_size=None, batch_tokens=24)
    b = make_micro_batches(range(8), lengths, epoch=1, seed=3, batch_size=None, batch_tokens=24)
    c = make_micro_batches(range(8), lengths, epoch=2, seed=3, batch_size=None, batch_tokens=24)
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(8))
    for batch in a:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 24


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from students.train import TrainConfig, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    def on_step_end(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(cfg, on_step_end=on_step_end)
""")


def test_resume_after_sigkill_replays_the_same_losses(kd_pair, tmp_path):
    """Kill -9 after step 5 (last checkpoint at 4), resume: per-step losses equal an uninterrupted run."""
    common = dict(quant="nf4", lora_dropout=0.1, steps=6, batch_size=8, save_every=2, eval_every=3)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    train(_cfg(kd_pair, ref_dir, **common))
    cfg = _cfg(kd_pair, run_dir, **common)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict()), "5"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (run_dir / "final").exists()
    assert (run_dir / "checkpoints" / "step-000004" / "trainer_state.json").is_file()
    assert max(m["step"] for m in read_metrics(run_dir)) == 5  # step 5 ran but is not in a checkpoint

    with pytest.raises(DistillError, match="--resume"):
        train(cfg)  # the run dir holds a run: refused without --resume, nothing touched
    cfg.resume = True
    summary = train(cfg)
    assert summary["steps"] == 6
    ref, got = _train_losses(ref_dir), _train_losses(run_dir)
    assert [s for s, *_ in got] == list(range(1, 7))
    assert got == ref  # exact: same data order, RNG (LoRA dropout), optimizer and scheduler state
    ev_ref = [(m["step"], m["eval_kl"]) for m in read_metrics(ref_dir) if m["kind"] == "eval"]
    ev_got = [(m["step"], m["eval_kl"]) for m in read_metrics(run_dir) if m["kind"] == "eval"]
    assert ev_got == ev_ref
    for name, value in _adapter(ref_dir).items():
        assert torch.equal(value, _adapter(run_dir)[name])


def test_run_killed_while_writing_its_first_run_json_starts_over(kd_pair, tmp_path):
    """A run killed inside its first atomic run.json write leaves only the temporary file: the rerun
    trains there (the pipeline's rerun after a kill) instead of calling the directory foreign."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.json.k1ll3d.tmp").write_text('{"half": ')
    summary = train(_cfg(kd_pair, out, steps=1, eval_every=0, save_every=0))
    assert summary["steps"] == 1 and (out / "run.json").is_file()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_run_dir_contents(kd_pair, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(kd_pair, out, steps=2, save_every=1, keep_checkpoints=1, eval_every=1))
    run = json.loads((out / "run.json").read_text())
    assert run["student"]["quant"] == "none" and run["student"]["lora"]["r"] == 4
    assert run["cache"]["tokenizer_fingerprint"].startswith("sha256:") and run["cache"]["manifest_sha256"]
    assert run["loss"]["name"] == "forward-kl" and run["loss"]["vocab_size"] == 320
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # keep=1, none at the last step
    ckpt = out / "checkpoints" / "step-000001"
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))  # no pickle anywhere
    for f in ("adapter_model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
              "rng.safetensors", "rng.json", "trainer_state.json"):
        assert (ckpt / f).is_file(), f
    assert (out / "final" / "tokenizer.json").is_file() and (out / "final" / "adapter_model.safetensors").is_file()
    m = read_metrics(out)
    assert {r["kind"] for r in m} == {"train", "eval"}
    train_rec = [r for r in m if r["kind"] == "train"][0]
    for key in ("loss", "kd", "ce", "kl", "lr", "tokens_per_s", "cpu_s", "valid_tokens"):
        assert key in train_rec
    assert summary["final_eval_kl"] > 0 and 0 <= summary["final_top1_agreement"] <= 1


def test_refusals_are_one_line(kd_pair, tmp_path):
    teacher, student, cache = kd_pair
    with pytest.raises(DistillError, match="does not exist"):
        train(_cfg(kd_pair, tmp_path / "a", cache=str(tmp_path / "nope")))
    with pytest.raises(DistillError, match="does not exist"):
        train(_cfg(kd_pair, tmp_path / "b", student=str(tmp_path / "nostudent")))
    # A student that does not load (broken config).
    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "x"}')
    with pytest.raises(DistillError) as err:
        train(_cfg(kd_pair, tmp_path / "c", student=str(broken)))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c" / "final").exists()
    # Tokenizer mismatch: a student with another vocabulary.
    from helpers import save_tiny_model, tiny_llama, tiny_tokenizer

    other = tmp_path / "other"
    tok = tiny_tokenizer(vocab_size=300)
    tiny_llama(tok, hidden_size=64).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(DistillError, match="tokenizer"):
        train(_cfg(kd_pair, tmp_path / "d", student=str(other)))
    assert not (tmp_path / "d").exists()
    # A corrupt shard fails verification before any training.
    bad = tmp_path / "badcache"
    shutil.copytree(cache, bad)
    shard = sorted(bad.glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DistillError):
        train(_cfg(kd_pair, tmp_path / "e", cache=str(bad)))
    # A run dir with another config is refused even with --resume.
    train(_cfg(kd_pair, tmp_path / "f", steps=1))
    with pytest.raises(DistillError, match="different config"):
        train(_cfg(kd_pair, tmp_path / "f", steps=1, lr=1e-3, resume=True))
    with pytest.raises(DistillError, match="either --steps or --epochs"):
        train(_cfg(kd_pair, tmp_path / "g", steps=1, epochs=1.0))


def test_cli_train_errors_exit_1(kd_pair, tmp_path, capsys):
    import cli

    _, student, _ = kd_pair
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--student", str(student), "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert sum(l.startswith("error:") for l in err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_padded_vocab_student_trains_with_extra_columns_masked(kd_pair, tmp_path):
    """Logits wider than the tokenizer (384 vs 320): the loss gets vocab_size=320, losses stay finite."""
    import math

    from helpers import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    wide = tmp_path / "wide"
    model = tiny_llama(tok, seed=2, hidden_size=64, pad_vocab_to=384)
    with torch.no_grad():
        model.lm_head.weight[320:] = 50.0  # huge logits on columns that are no token: must not matter
    model.save_pretrained(wide)
    tok.save_pretrained(wide)
    out = tmp_path / "run"
    summary = train(_cfg(kd_pair, out, student=str(wide), steps=2))
    assert json.loads((out / "run.json").read_text())["loss"]["vocab_size"] == 320
    recs = [m for m in read_metrics(out) if m["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) and r["kl"] < 20 for r in recs)
    assert math.isfinite(summary["final_eval_kl"]) and summary["final_eval_kl"] < 20


def _heldout(kd_pair, eval_fraction=0.2, seed=0):
    """The trainer's held-out samples of the kd_pair cache, and the student's tokenizer."""
    from distill.cache.reader import CacheDataset, split_indices
    from distill.models import load_tokenizer
    from students.train import open_cache

    tok = load_tokenizer(str(kd_pair[1]))
    reader, manifest = open_cache(kd_pair[2], tok)
    _, eval_idx = split_indices(len(reader), eval_fraction, seed=seed)
    return CacheDataset(reader, eval_idx), tok, int(manifest.pad_id)


def test_failed_head_check_trains_on_the_models_own_logits(kd_pair, tmp_path, monkeypatch, capsys):
    """A student whose forward scales its logits (post-processing the chunked head does not know) is
    trained and evaluated on its own full logits, and the user is told so."""
    from transformers import LlamaForCausalLM

    from distill.evaluate import evaluate_on_cache

    original = LlamaForCausalLM.forward

    def forward_scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 10.0
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward_scaled)
    out = tmp_path / "run"
    summary = train(_cfg(kd_pair, out, steps=2, eval_every=100))
    err = capsys.readouterr().err
    assert "warning: head check failed (head(hidden) differs from the model's logits" in err
    assert "uses the model's full logits instead" in err
    head = json.loads((out / "run.json").read_text())["head"]
    assert head["path"] == "full-logits" and head["max_abs_diff"] > head["tolerance"] and head["tokens"] > 0
    assert summary["head_path"] == "full-logits"
    # The step-0 held-out KL (LoRA B = 0: the base model) is that of the model's own scaled logits.
    data, tok, pad_id = _heldout(kd_pair)
    base = LlamaForCausalLM.from_pretrained(str(kd_pair[1])).eval()
    full = evaluate_on_cache(base, tok, data, pad_id=pad_id, full_logits=True)
    chunked = evaluate_on_cache(base, tok, data, pad_id=pad_id, full_logits=False)
    assert summary["initial_eval_kl"] == pytest.approx(full["kl"], rel=1e-4)
    assert abs(full["kl"] - chunked["kl"]) > 0.1
    assert evaluate_on_cache(base, tok, data, pad_id=pad_id)["head_path"] == "full-logits"  # checks by itself
    # the recorded check is an outcome, not a setting: --resume of the same run is not refused
    assert train(_cfg(kd_pair, out, steps=2, eval_every=100, resume=True))["head_path"] == "full-logits"


def test_multimodal_gemma_student_passes_the_head_check(kd_pair, tmp_path, capsys):
    """Gemma-4 ForConditionalGeneration keeps its logit soft-cap in the text config: the head check must
    pass (the chunked head applies the cap) and training run through the chunked head."""
    from helpers import tiny_gemma4_multimodal, tiny_tokenizer

    tok = tiny_tokenizer()
    student = tmp_path / "gemma"
    tiny_gemma4_multimodal(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(student)
    tok.save_pretrained(student)
    out = tmp_path / "run"
    summary = train(_cfg(kd_pair, out, student=str(student), steps=2, eval_every=100))
    err = capsys.readouterr().err
    assert "head check: the chunked head matches the model's own logits" in err and "warning" not in err
    head = json.loads((out / "run.json").read_text())["head"]
    assert head["path"] == "chunked-head" and head["max_abs_diff"] <= 1e-5
    assert summary["head_path"] == "chunked-head" and summary["final_eval_kl"] == summary["final_eval_kl"]  # not NaN
