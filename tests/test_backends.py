"""The teacher-backend seam: `--backend` picks a registered backend, an unknown name is one line, the
backend's name is recorded with the cache and the traces, and the Hugging Face backend's two operations
keep their contract (sparse top-k over the tokenizer vocabulary; per-row seeded generation)."""

from __future__ import annotations

import json

import pytest
import torch

import cli
from distill.cache.reader import CacheReader
from distill.errors import DistillError
from teachers.backends import BACKENDS, TeacherBackend, get_backend
from teachers.backends.hf import HFBackend
from teachers.cache_build import build_cache
from teachers.generate import generate_traces, read_traces

RECORDS = [{"prompt": f"Q{i}: 2+{i}?", "completion": f" {2 + i}. The answer is {2 + i}."} for i in range(4)]


class AltBackend(HFBackend):
    """A second registered backend (the HF one under another name): what adding a backend looks like."""

    name = "alt"


def _run(capsys, args):
    capsys.readouterr()
    try:
        cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["cache", "generate"])
def test_unknown_backend_is_one_line_and_writes_nothing(command, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / ("cache" if command == "cache" else "t.jsonl")
    if command == "cache":
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        args = ["cache", "build", "--teacher", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                "--top-k", "4", "--no-progress", "--backend", "vllm-nope"]
    else:
        args = ["teacher", "generate", "--teacher", str(tiny_model_dir), "--data", "synthetic:2", "--out", str(out),
                "--backend", "vllm-nope"]
    code, err = _run(capsys, args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0] == "error: unknown --backend 'vllm-nope'; known backends: hf"
    assert not out.exists()


def test_get_backend_refuses_unknown_name():
    with pytest.raises(DistillError, match="known backends: hf"):
        get_backend("nope", "org/model")


def test_backend_name_is_recorded_and_resume_needs_the_same_backend(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS, "alt", AltBackend)
    hf = build_cache(str(tiny_model_dir), None, tmp_path / "hf", top_k=4, records=RECORDS, progress=False,
                     log=lambda m: None)
    assert hf.teacher["backend"] == "hf" and hf.build["backend"] == "hf"
    alt = build_cache(str(tiny_model_dir), None, tmp_path / "alt", top_k=4, records=RECORDS, progress=False,
                      log=lambda m: None, backend="alt")
    assert alt.teacher["backend"] == "alt" and alt.build["backend"] == "alt"
    # same weights, same numbers: the registry only changed which class ran them
    a, b = CacheReader(tmp_path / "hf"), CacheReader(tmp_path / "alt")
    assert all(torch.equal(a[i]["target_ids"], b[i]["target_ids"]) for i in range(len(RECORDS)))
    with pytest.raises(DistillError, match="different teacher"):
        build_cache(str(tiny_model_dir), None, tmp_path / "alt", top_k=4, records=RECORDS, progress=False,
                    log=lambda m: None, backend="hf")

    traces = tmp_path / "t.jsonl"
    kwargs = dict(teacher=str(tiny_model_dir), data="synthetic:2", out=traces, max_new_tokens=4, progress=False)
    generate_traces(**kwargs, backend="alt")
    assert {r["teacher"]["backend"] for r in read_traces(traces)} == {"alt"}
    with pytest.raises(DistillError, match="another teacher"):
        generate_traces(**kwargs)


def test_hf_backend_contract(tiny_model_dir, tiny_tok):
    backend = get_backend("hf", str(tiny_model_dir), device="cpu")
    assert isinstance(backend, TeacherBackend)
    assert backend.vocab_size == len(tiny_tok) and backend.logits_width >= backend.vocab_size
    assert backend.identity["name_or_path"] == str(tiny_model_dir.resolve())
    seqs = [tiny_tok("Tom has 3 apples and buys 4 more.")["input_ids"], tiny_tok("0 1 2 3")["input_ids"]]
    positions = [torch.arange(1, len(seqs[0]) - 1), torch.arange(0, len(seqs[1]) - 1)]
    ids, lps = backend.score(seqs, positions, k=5, temperature=2.0)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.device.type == "cpu"
    assert ids.shape == lps.shape == (sum(len(p) for p in positions), 5)
    with torch.no_grad():
        dense = [torch.log_softmax(backend.model(torch.tensor([s])).logits[0].float() / 2.0, -1) for s in seqs]
    ref = torch.cat([d[p] for d, p in zip(dense, positions)]).topk(5, dim=-1).values
    assert torch.allclose(lps, ref, atol=1e-5)
    assert (lps[:, :-1] >= lps[:, 1:]).all() and (1 - lps.exp().sum(-1) > 0).all()  # a tail mass remains

    prompt = tiny_tok("Question: 2 + 2?", add_special_tokens=False)["input_ids"]
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=6)
    together = backend.generate([prompt, prompt], [11, 12], **kw)
    alone = backend.generate([prompt], [12], **kw)
    assert together[1].token_ids == alone[0].token_ids  # seeded per row, not per batch
    assert together[0].token_ids != together[1].token_ids


def test_bad_options_fail_before_the_tokenizer_loads(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(DistillError, match="--teacher-quant"):
        get_backend("hf", missing, quant="fp3")
    with pytest.raises(DistillError, match="--teacher-dtype"):
        get_backend("hf", missing, dtype="fp8")
    with pytest.raises(DistillError, match="does not exist"):
        get_backend("hf", missing)
