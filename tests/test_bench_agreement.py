"""Held-out agreement in the bench: ECE computed right, KL/top-1 equal the trainer's evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from distill.bench.agreement import agreement_with_teacher, calibration_pass, open_cache
from distill.bench.stats import expected_calibration_error

TEXTS = [
    {"prompt": "Tom has 3 apples and buys 4 more.", "completion": " 3 + 4 = 7. The answer is 7."},
    {"prompt": "What is 15 minus 8?", "completion": " 15 - 8 = 7. #### 7"},
    {"prompt": "Sara reads 20 pages each night.", "completion": " After 6 nights she has read 120 pages."},
]


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tmp_path_factory):
    from teachers.cache_build import build_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(str(tiny_model_dir), None, out, top_k=4, records=TEXTS, batch_size=2, progress=False, log=lambda m: None)
    return out


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_ece_matches_a_full_logits_reference(tiny_cache, tiny_student_dir):
    from distill.cache.reader import collate

    model, tok = _load(tiny_student_dir)
    reader = open_cache(str(tiny_cache), tok)
    got = calibration_pass(model, reader, vocab_size=len(tok), batch_size=2, pad_id=tok.pad_token_id)
    batch = collate([reader[i] for i in range(len(reader))], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    valid = batch["targets"] != -100
    probs = torch.softmax(logits[valid][:, : len(tok)], dim=-1)
    conf, pred = probs.max(-1)
    hit = pred == batch["target_ids"][valid][:, 0]
    assert got["tokens"] == int(valid.sum())
    assert got["top1_agreement"] == pytest.approx(float(hit.float().mean()))
    assert got["ece"] == pytest.approx(expected_calibration_error(conf.tolist(), hit.tolist()), abs=1e-5)


def test_teacher_agrees_with_its_own_cache_and_student_less(tiny_cache, tiny_model_dir, tiny_student_dir):
    teacher, ttok = _load(tiny_model_dir)
    student, stok = _load(tiny_student_dir)
    t = agreement_with_teacher(teacher, ttok, str(tiny_cache), batch_size=2)
    s = agreement_with_teacher(student, stok, str(tiny_cache), batch_size=2)
    assert t["kl"] == pytest.approx(0.0, abs=1e-3)  # fp16-stored log-probs: rounding only
    assert t["top1_agreement"] > 0.95
    assert s["kl"] > 100 * t["kl"] and s["kl"] > 1e-5  # random tiny models are near-uniform: small but clearly apart
    assert 0.0 <= s["ece"] <= 1.0 and t["tokens"] == s["tokens"] > 0
    # the bench's own top-1 count equals the trainer's evaluation
    reader = open_cache(str(tiny_cache), stok)
    own = calibration_pass(student, reader, vocab_size=len(stok), batch_size=2, pad_id=stok.pad_token_id)
    assert own["top1_agreement"] == pytest.approx(s["top1_agreement"])


def test_bench_with_held_out_cache(tiny_cache, tiny_model_dir, tiny_student_dir, tmp_path):
    """Agreement columns appear; a model with another tokenizer gets 'n/a' and a reason, not a crash."""
    from distill.bench.runner import run_bench
    from helpers import tiny_llama, tiny_tokenizer

    other = tmp_path / "other"
    tok = tiny_tokenizer(vocab_size=300)
    tiny_llama(tok, seed=3).save_pretrained(other)
    tok.save_pretrained(other)
    res = run_bench({"teacher": str(tiny_model_dir), "student": str(tiny_student_dir), "other": str(other)},
                    task="synthetic", limit=2, out=tmp_path / "o", select="greedy", held_out_cache=str(tiny_cache),
                    max_new_tokens=8, progress=False)
    by = {m["name"]: m for m in res["models"]}
    assert by["teacher"]["agreement"]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert by["student"]["agreement"]["ece_target"] == "teacher_top1"
    assert "another tokenizer" in by["other"]["agreement"]["error"]
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| KL | top-1 agree | ECE |" in md and "n/a" in md
    assert json.loads((tmp_path / "o" / "results.json").read_text())["settings"]["held_out_cache"] == str(tiny_cache)


def test_missing_cache_fails_before_loading(tiny_model_dir, tmp_path):
    from distill.bench.runner import run_bench
    from distill.errors import DistillError

    with pytest.raises(DistillError):
        run_bench([f"t={tiny_model_dir}"], task="synthetic", limit=1, out=tmp_path / "o",
                  held_out_cache=str(tmp_path / "none"), progress=False)
    assert not (tmp_path / "o").exists()
