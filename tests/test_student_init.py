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
