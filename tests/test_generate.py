"""Trace generation with a tiny real model: prompts, seeded sampling, self log-probs, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
from distill.models.sampling import DEFAULT_SYSTEM_PROMPT, GenerationStats, format_prompt, sample_completions
from helpers import tiny_llama, tiny_tokenizer
from teachers.generate import generate_traces, read_traces

QUESTIONS = ["What is 2 + 2?", "Tom has 3 apples and buys 4 more. How many apples does he have?", "x"]


@pytest.fixture(scope="module")
def model_tok():
    tok = tiny_tokenizer()
    return tiny_llama(tok, seed=0), tok


def test_format_prompt_uses_chat_template(tiny_tok):
    text = format_prompt(tiny_tok, "What is 2 + 2?", "Think first.")
    assert text == ("<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "system" not in format_prompt(tiny_tok, "q")


def test_format_prompt_without_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    assert format_prompt(tok, "What is 2 + 2?", "Sys.") == "Sys.\n\nQuestion: What is 2 + 2?\nAnswer:"


def test_sampling_is_reproducible_and_independent_of_batching(model_tok):
    model, tok = model_tok
    prompts = [format_prompt(tok, q, "sys") for q in QUESTIONS]
    kwargs = dict(num_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)
    stats = GenerationStats()
    a = sample_completions(model, tok, prompts, batch_size=4, stats=stats, **kwargs)
    b = sample_completions(model, tok, prompts, batch_size=1, **kwargs)
    c = sample_completions(model, tok, prompts, batch_size=4, **{**kwargs, "seed": 4})
    texts = lambda r: [[x.token_ids for x in row] for row in r]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert a[0][0].token_ids != a[0][1].token_ids  # two samples of one prompt differ
    assert stats.completions == 6 and stats.new_tokens == sum(x.num_tokens for row in a for x in row)
    assert stats.tokens_per_s > 0


def test_greedy_matches_transformers_generate(model_tok):
    model, tok = model_tok
    prompts = [format_prompt(tok, q) for q in QUESTIONS]
    ours = sample_completions(model, tok, prompts, max_new_tokens=10, batch_size=3)  # padded batch
    for prompt, row in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        ref_ids = ref[0, ids["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in ref_ids:
            ref_ids = ref_ids[:ref_ids.index(tok.eos_token_id)]
        assert row[0].token_ids == ref_ids


def test_mean_logprob_is_the_models_own_logprob(model_tok):
    """Self score: mean log p of the generated tokens (EOS included), untempered, as a forward pass gives."""
    model, tok = model_tok
    prompt = format_prompt(tok, QUESTIONS[1])
    comp = sample_completions(model, tok, [prompt], temperature=1.7, top_p=0.8, max_new_tokens=15, seed=1)[0][0]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    gen = comp.token_ids + ([tok.eos_token_id] if comp.finished else [])
    ids = torch.tensor([prompt_ids + gen])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    expected = sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(gen)) / len(gen)
    assert comp.num_tokens == len(gen)
    assert comp.mean_logprob == pytest.approx(expected, abs=1e-4)


def test_stops_at_eos(model_tok):
    model, tok = model_tok
    eos = tok.eos_token_id

    def after_two_tokens(module, args, output):  # force EOS once two tokens were generated
        if args[0].shape[1] == 1 and hook.calls >= 2:
            output = output.clone()
            output[..., eos] += 1e4
        hook.calls += 1
        return output

    hook = model.lm_head.register_forward_hook(after_two_tokens)
    hook.calls = 0
    try:
        comp = sample_completions(model, tok, [format_prompt(tok, "q")], max_new_tokens=20)[0][0]
    finally:
        hook.remove()
    assert comp.finished and comp.num_tokens == 3 and len(comp.token_ids) == 2 and eos not in comp.token_ids


def test_padded_vocab_columns_are_never_sampled():
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=2, pad_vocab_to=len(tok) + 200)
    with torch.no_grad():
        model.lm_head.weight[len(tok):] = model.lm_head.weight[:200] * 50  # make padded columns attractive
    rows = sample_completions(model, tok, [format_prompt(tok, "q")], num_samples=4, temperature=2.0,
                              max_new_tokens=16, seed=0)
    assert all(t < len(tok) for c in rows[0] for t in c.token_ids)


def _gen(model_dir, out, **kw):
    args = dict(teacher=str(model_dir), data="synthetic:5", out=out, samples=2, temperature=1.0,
                max_new_tokens=8, batch_size=3, seed=0, progress=False)
    args.update(kw)
    return generate_traces(**args)


def test_generate_traces_records_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "traces.jsonl"
    summary = _gen(tiny_model_dir, out)
    assert summary["written"] == 10 and summary["stats"]["tokens_per_s"] > 0
    recs = read_traces(out)
    assert [(r["prompt_id"], r["sample"]) for r in recs] == [(f"synthetic-0-{i}", s) for i in range(5) for s in (0, 1)]
    first = recs[0]
    assert first["settings"]["system_prompt"] == DEFAULT_SYSTEM_PROMPT
    assert first["settings"]["temperature"] == 1.0 and first["settings"]["seed"] == 0
    assert first["teacher"]["config_hash"].startswith("sha256:") and first["teacher"]["weights_probe"]
    assert first["gold"].isdigit() and "####" in first["reference"]
    assert first["num_tokens"] >= 1 and isinstance(first["mean_logprob"], float)
    before = out.read_bytes()
    assert _gen(tiny_model_dir, out)["written"] == 0  # complete: nothing to do
    assert out.read_bytes() == before
    more = _gen(tiny_model_dir, out, samples=3)  # a third sample per problem is added, not redone
    assert more["written"] == 5 and more["skipped"] == 10
    assert out.read_bytes().startswith(before)


def test_truncated_last_line_is_dropped_and_redone(tiny_model_dir, tmp_path):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    _gen(tiny_model_dir, full)
    data = full.read_bytes()
    lines = data.split(b"\n")
    cut.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2])  # 4 lines + half a line
    assert len(read_traces(cut)) == 4
    _gen(tiny_model_dir, cut)
    key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    assert sorted(read_traces(cut), key=key) == sorted(read_traces(full), key=key)


def test_resume_refuses_other_settings_or_teacher(tiny_model_dir, tiny_student_dir, tmp_path):
    from distill.errors import DistillError

    out = tmp_path / "t.jsonl"
    _gen(tiny_model_dir, out, data="synthetic:2", samples=1)
    with pytest.raises(DistillError, match="other settings"):
        _gen(tiny_model_dir, out, data="synthetic:2", samples=1, temperature=0.5)
    with pytest.raises(DistillError, match="another teacher"):
        _gen(tiny_student_dir, out, data="synthetic:2", samples=1)


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    args = ["teacher", "generate", "--teacher", str(tiny_model_dir), "--data", "synthetic:16", "--samples", "1",
            "--temperature", "1.0", "--max-new-tokens", "24", "--batch-size", "1", "--seed", "5"]
    killed = tmp_path / "killed.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and killed.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_traces(killed))
    assert 2 <= partial < 16, f"the kill came too late to test resuming ({partial} traces written)"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--out", str(killed)])
    assert exit_info.value.code in (0, None)
    full = tmp_path / "full.jsonl"
    with pytest.raises(SystemExit):
        cli.main([*args, "--out", str(full)])
    key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    resumed, reference = sorted(read_traces(killed), key=key), sorted(read_traces(full), key=key)
    assert len(reference) == 16
    assert resumed == reference


@pytest.mark.parametrize("extra,message", [
    (["--data", "missing.jsonl"], "problems not found"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--field", "question"], "--field"),
])
def test_cli_bad_inputs_are_one_line_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    args = ["teacher", "generate", "--teacher", str(tiny_model_dir), "--data", "synthetic:2",
            "--out", str(tmp_path / "t.jsonl"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "t.jsonl").exists()


def test_cli_mismatched_resume_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    base = ["teacher", "generate", "--teacher", str(tiny_model_dir), "--data", "synthetic:2", "--out", str(out),
            "--max-new-tokens", "4"]
    with pytest.raises(SystemExit):
        cli.main(base)
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--seed", "9"])
    assert exit_info.value.code == 1
    assert "other settings (seed: 0 != 9)" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_generic_jsonl_with_field_mapping(tiny_model_dir, tmp_path):
    data = tmp_path / "probs.jsonl"
    data.write_text(json.dumps({"uid": "a", "problem": "1 + 1?", "solution": "2"}) + "\n"
                    + json.dumps({"uid": "b", "problem": "2 + 2?", "solution": "4"}) + "\n")
    out = tmp_path / "t.jsonl"
    _gen(tiny_model_dir, out, data=str(data), samples=1,
         fields={"question": "problem", "answer": "solution", "id": "uid"})
    recs = read_traces(out)
    assert [(r["prompt_id"], r["question"], r["gold"]) for r in recs] == [("a", "1 + 1?", "2"), ("b", "2 + 2?", "4")]
    assert Path(out).read_text().count("\n") == 2
