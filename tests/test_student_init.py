"""`distill student init`: keep a subset of the teacher's decoder layers, fix the config, save a plain model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from students.init_student import init_student, parse_keep_layers

REPO = Path(__file__).resolve().parents[1]


def test_parse_keep_layers():
    assert parse_keep_layers("every:2", 6) == [0, 2, 4]
    assert parse_keep_layers("first:3", 6) == [0, 1, 2]
    assert parse_keep_layers("last:2", 6) == [4, 5]
    assert parse_keep_layers("0,2,4-5", 6) == [0, 2, 4, 5]
    assert parse_keep_layers("3,1,1", 6) == [1, 3]
    for bad in ("", "every:0", "first:7", "6", "1-", "a,b", "3-1"):
        with pytest.raises(DistillError):
            parse_keep_layers(bad, 6)


def _qwen2_teacher(directory: Path) -> Path:
    """A tiny 4-layer Qwen2 with sliding-window layers: its config has a per-layer `layer_types` list."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_keeps_chosen_layers_and_fixes_config(tmp_path):
    teacher_dir = _qwen2_teacher(tmp_path / "teacher")
    summary = init_student(teacher_dir, tmp_path / "student", keep_layers="1,3")
    assert summary["kept_layers"] == [1, 3] and summary["student_layers"] == 2
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    cfg = student.config
    assert cfg.num_hidden_layers == 2
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    assert cfg.max_window_layers == 1
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    for new, old in enumerate([1, 3]):
        for name, p in student.model.layers[new].state_dict().items():
            assert torch.equal(p, teacher.model.layers[old].state_dict()[name]), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert list((tmp_path / "student").glob("*.safetensors")) and not list((tmp_path / "student").glob("*.bin"))
    tok_s = AutoTokenizer.from_pretrained(tmp_path / "student")
    tok_t = AutoTokenizer.from_pretrained(teacher_dir)
    from distill.cache.format import tokenizer_fingerprint

    assert tokenizer_fingerprint(tok_s) == tokenizer_fingerprint(tok_t)
    # It runs, with a KV cache (layer_idx slots), and generation matches a no-cache forward.
    ids = torch.tensor([tok_s.encode("Tom has 3 apples")])
    out = student.generate(ids, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        logits = student(input_ids=out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, ids.shape[1] - 1:].argmax(-1), out[0, ids.shape[1]:])


def test_keep_all_layers_reproduces_the_teacher(tiny_model_dir, tmp_path):
    init_student(tiny_model_dir, tmp_path / "same", keep_layers="every:1")
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "same")
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_cli_init_and_errors(tiny_model_dir, tmp_path, capsys):
    import cli

    ok = subprocess.run([sys.executable, "-m", "cli", "student", "init", "--teacher", str(tiny_model_dir), "--out",
                         str(tmp_path / "s"), "--keep-layers", "first:1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-1500:]
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1
    for args in (["--keep-layers", "5"], ["--keep-layers", "every:x"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main(["student", "init", "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "t"), *args])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert sum(l.startswith("error:") for l in err.splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "t").exists()
    with pytest.raises(DistillError, match="not empty"):
        init_student(tiny_model_dir, tmp_path / "s", keep_layers="first:1")
    with pytest.raises(DistillError, match="does not exist"):
        init_student(tmp_path / "missing", tmp_path / "u", keep_layers="first:1")


def _kl(teacher_dir, student_dir, batches) -> float:
    """KL(teacher || student) on the scored calibration positions, each model loaded from its directory."""
    t = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    s = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, att, scored in batches:
            lp = torch.log_softmax(t(input_ids=ids, attention_mask=att).logits[scored].double(), -1)
            lq = torch.log_softmax(s(input_ids=ids, attention_mask=att).logits[scored].double(), -1)
            total += float((lp.exp() * (lp - lq)).sum())
            n += int(scored.sum())
    return total / n


def test_importance_keeps_the_layers_whose_removal_costs_most(tmp_path):
    """importance:N drops the layers whose single removal gives the smallest KL, checked by building every
    one-layer-removed student and measuring it; rounds=2 matches the greedy search done by brute force."""
    from helpers import save_tiny_model
    from students.init_student import calibration_batches

    teacher = save_tiny_model(tmp_path / "teacher", seed=3, num_layers=4, hidden_size=64)
    calib = tmp_path / "calib.jsonl"
    lines = ["Tom has 3 apples and buys 4 more.", "The train leaves at 9 and arrives at 11.",
             "Sara reads 12 pages a day for a week.", "A box holds 6 eggs; how many in 5 boxes?"]
    calib.write_text("".join(json.dumps({"prompt": "Q: " + t, "completion": " A: " + t[::-1]}) + "\n" for t in lines))
    tok = AutoTokenizer.from_pretrained(teacher)
    batches = calibration_batches(tok, calib, 16, 256)  # the defaults of init_student
    single = {i: _kl(teacher, init_student(teacher, tmp_path / f"drop{i}", keep_layers=",".join(
        str(j) for j in range(4) if j != i))["out"], batches) for i in range(4)}
    assert len({round(v, 6) for v in single.values()}) == 4  # distinct, so the choice is determined

    summary = init_student(teacher, tmp_path / "imp", keep_layers="importance:2", calibration=calib)
    expected = sorted(sorted(single, key=single.get)[2:])
    assert summary["kept_layers"] == expected and summary["importance"]["dropped"] == sorted(sorted(single, key=single.get)[:2])
    for i, v in single.items():  # the hook-skipped model scores what the rebuilt student measures
        assert summary["importance"]["scores"][0][str(i)] == pytest.approx(v, rel=1e-4, abs=1e-9)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "imp")
    assert student.config.num_hidden_layers == 2
    init_student(teacher, tmp_path / "listed", keep_layers=",".join(map(str, expected)))
    assert _kl(tmp_path / "listed", tmp_path / "imp", batches) == pytest.approx(0.0, abs=1e-9)

    # rounds=2: drop the best single layer, then the best second one given the first (brute force on pairs).
    first = min(single, key=single.get)
    pair = {j: _kl(teacher, init_student(teacher, tmp_path / f"drop{first}{j}", keep_layers=",".join(
        str(k) for k in range(4) if k not in (first, j)))["out"], batches) for j in range(4) if j != first}
    greedy = init_student(teacher, tmp_path / "greedy", keep_layers="importance:2", calibration=calib, importance_rounds=2)
    assert greedy["importance"]["dropped"] == sorted([first, min(pair, key=pair.get)])


def test_importance_errors(tiny_model_dir, tmp_path):
    with pytest.raises(DistillError, match="needs --calibration"):
        init_student(tiny_model_dir, tmp_path / "a", keep_layers="importance:1")
    with pytest.raises(DistillError, match="not a file"):
        init_student(tiny_model_dir, tmp_path / "b", keep_layers="importance:1", calibration=tmp_path / "nope.jsonl")
    calib = tmp_path / "c.jsonl"
    calib.write_text(json.dumps({"text": "Tom has 3 apples"}) + "\n")
    with pytest.raises(DistillError, match="1 <= N <= 2"):
        init_student(tiny_model_dir, tmp_path / "c", keep_layers="importance:3", calibration=calib)
    with pytest.raises(DistillError, match="importance:x"):
        init_student(tiny_model_dir, tmp_path / "d", keep_layers="importance:x", calibration=calib)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_importance_replaying_earlier_layers_scores_as_whole_forwards(tmp_path):
    """The fast path (outputs of the layers before each candidate replayed, head on the scored rows
    only) gives the scores and choices of one whole forward per candidate, over two rounds."""
    from helpers import save_tiny_model
    from students.init_student import calibration_batches, importance_keep

    teacher = save_tiny_model(tmp_path / "teacher", seed=5, num_layers=5, hidden_size=64)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": f"Q: {a} plus {b}?", "completion": f" A: {a + b}, since {a} + {b}."})
                             + "\n" for a, b in ((3, 4), (12, 30), (7, 7), (100, 1))))
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    batches = calibration_batches(tok, calib, 16, 256, batch_size=3)  # two batches, the second shorter
    layers = model.model.layers
    fast = importance_keep(model, layers, batches, 2, rounds=2)
    slow = importance_keep(model, layers, batches, 2, rounds=2, replay=False)
    assert fast[0] == slow[0] and fast[1]["dropped"] == slow[1]["dropped"]
    for f, s in zip(fast[1]["scores"], slow[1]["scores"]):
        assert f.keys() == s.keys()
        for k in f:
            assert f[k] == pytest.approx(s[k], rel=1e-5, abs=1e-9)
    assert not any("forward" in layer.__dict__ for layer in layers)  # the layers are left as they were
