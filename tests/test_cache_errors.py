"""Every bad input gets a one-line error, exit code 1, no traceback, and nothing already written is lost;
verify catches a flipped byte and a truncated shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from distill.cache.verify import verify_cache
from distill.errors import DistillError

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, args):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = 0
    try:
        cli.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 1, err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("Loading weights", "Writing model"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def _build_args(teacher, data, out, *extra):
    return ["cache", "build", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--top-k", "4",
            "--no-progress", *extra]


@pytest.fixture()
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q{i}: 2+{i}?", "completion": f" {2 + i}"}) + "\n" for i in range(5)))
    return p


@pytest.fixture()
def built(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "cache"
    code, _, err = _run(capsys, _build_args(tiny_model_dir, data, out, "--shard-size", "2"))
    assert code == 0, err
    return out


def test_bad_data_inputs(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, _build_args(tiny_model_dir, tmp_path / "missing.jsonl", out))
    _assert_one_line_error(code, err, "not found")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = _run(capsys, _build_args(tiny_model_dir, empty, out))
    _assert_one_line_error(code, err, "empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    code, _, err = _run(capsys, _build_args(tiny_model_dir, blank, out))
    _assert_one_line_error(code, err, "no records")
    nofields = tmp_path / "nofields.jsonl"
    nofields.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    code, _, err = _run(capsys, _build_args(tiny_model_dir, nofields, out))
    _assert_one_line_error(code, err, "--field")
    # the same file works once the fields are mapped
    code, _, err = _run(capsys, _build_args(tiny_model_dir, nofields, out, "--field", "prompt=question", "--field", "completion=answer"))
    assert code == 0, err


def test_bad_options(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "out"
    args = _build_args(tiny_model_dir, data, out)
    code, _, err = _run(capsys, [a if a != "4" else "1000" for a in args])
    _assert_one_line_error(code, err, "smaller than the teacher's vocabulary", "320")
    # k equal to the vocabulary: no tail, and the rounded values leave one no student can match
    code, _, err = _run(capsys, [a if a != "4" else "320" for a in args])
    _assert_one_line_error(code, err, "--top-k 320", "smaller than the teacher's vocabulary")
    code, _, err = _run(capsys, args + ["--dtype", "fp8"])
    _assert_one_line_error(code, err, "--dtype")
    code, _, err = _run(capsys, args + ["--teacher-quant", "fp3"])
    _assert_one_line_error(code, err, "--teacher-quant")
    code, _, err = _run(capsys, args + ["--device-map", "everywhere"])
    _assert_one_line_error(code, err, "--device-map", "auto")
    code, _, err = _run(capsys, _build_args(tmp_path / "no_such_teacher_dir", data, out))
    _assert_one_line_error(code, err, "teacher")
    assert not out.exists()  # nothing written on refusal


def test_foreign_output_dir_refused_and_kept(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    code, _, err = _run(capsys, _build_args(tiny_model_dir, data, out))
    _assert_one_line_error(code, err, "not empty")
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_build_killed_while_writing_its_first_manifest_resumes(tmp_path, tiny_model_dir, data, capsys):
    """SIGKILL inside the first atomic manifest write leaves only its temporary file: the directory is
    ours, not foreign, so a rerun builds (and sweeps the leftover) instead of refusing it; a foreign
    file beside such a leftover is still refused."""
    out = tmp_path / "cache"
    out.mkdir()
    (out / ".manifest.json.k1ll3d.tmp").write_text('{"half": ')  # what atomic_write_bytes leaves when killed
    code, _, err = _run(capsys, _build_args(tiny_model_dir, data, out))
    assert code == 0, err
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    verify_cache(out)  # raises on any fault

    other = tmp_path / "other"
    other.mkdir()
    (other / ".manifest.json.k1ll3d.tmp").write_text("")
    (other / "notes.txt").write_text("precious")
    code, _, err = _run(capsys, _build_args(tiny_model_dir, data, other))
    _assert_one_line_error(code, err, "not empty")
    assert (other / "notes.txt").read_text() == "precious"


def test_mismatched_resume_refused(tmp_path, tiny_model_dir, tiny_student_dir, data, built, capsys):
    before = {p.name: p.read_bytes() for p in built.iterdir()}
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "different", "completion": " data"}) + "\n")
    cases = [
        (_build_args(tiny_model_dir, data, built, "--shard-size", "2", "--top-k", "8"), "different k"),
        (_build_args(tiny_model_dir, data, built, "--shard-size", "2", "--temperature", "2"), "different temperature"),
        (_build_args(tiny_student_dir, data, built, "--shard-size", "2"), "different teacher"),
        (_build_args(tiny_model_dir, other, built, "--shard-size", "2"), "different"),
        (_build_args(tiny_model_dir, data, built, "--shard-size", "2", "--dtype", "bf16"), "different value dtype"),
    ]
    for args, needle in cases:
        code, _, err = _run(capsys, args)
        _assert_one_line_error(code, err, needle)
    after = {p.name: p.read_bytes() for p in built.iterdir()}
    assert after == before  # the existing cache is untouched
    # the same command again is a no-op on a complete cache
    code, _, err = _run(capsys, _build_args(tiny_model_dir, data, built, "--shard-size", "2"))
    assert code == 0 and "already complete" in err


def test_mismatched_tokenizer_resume_refused(tmp_path, data, built, capsys):
    from helpers import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=300)
    d = tmp_path / "t300"
    tiny_llama(tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    code, _, err = _run(capsys, _build_args(d, data, built, "--shard-size", "2"))
    _assert_one_line_error(code, err, "different")


def test_verify_ok_and_info(built, capsys):
    code, out, err = _run(capsys, ["cache", "verify", str(built)])
    assert code == 0 and out.startswith("ok: 3 shards"), err
    code, out, _ = _run(capsys, ["cache", "info", str(built), "--json"])
    info = json.loads(out)
    assert info["sequences"] == 5 and info["k"] == 4 and info["vocab"] == 320 and info["codec"] == "topk"
    assert info["bytes_per_token"] > 0 and 0 < info["mean_tail_mass"] < 1 and info["tokenizer_fingerprint"].startswith("sha256:")
    code, out, _ = _run(capsys, ["cache", "info", str(built)])
    assert "mean tail mass" in out and "bytes per token" in out


def test_verify_catches_flipped_byte(built, capsys):
    shard = built / "shard-r00-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match="shard-r00-00001.safetensors"):
        verify_cache(built)
    code, _, err = _run(capsys, ["cache", "verify", str(built)])
    _assert_one_line_error(code, err, "shard-r00-00001.safetensors", "checksum")


def test_verify_catches_truncated_shard(built, capsys):
    shard = built / "shard-r00-00002.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    code, _, err = _run(capsys, ["cache", "verify", str(built)])
    _assert_one_line_error(code, err, "shard-r00-00002.safetensors", "truncated")


def test_verify_catches_structural_fault_with_good_checksum(built, capsys):
    """A shard rewritten with wrong shapes (checksum updated to match) is still caught."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save

    shard = built / "shard-r00-00000.safetensors"
    t = load_file(shard)
    t["topk_logprobs"] = torch.flip(t["topk_logprobs"], dims=[1]).contiguous()  # ascending: wrong order
    blob = save(t)
    shard.write_bytes(blob)
    m = json.loads((built / "manifest.json").read_text())
    m["shards"][0].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    (built / "manifest.json").write_text(json.dumps(m))
    code, _, err = _run(capsys, ["cache", "verify", str(built)])
    _assert_one_line_error(code, err, "shard-r00-00000.safetensors", "sorted")


def test_real_exit_code_of_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "cache", "verify", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_missing_teacher_path_fails_without_the_hub(tmp_path, monkeypatch):
    """A path that does not exist is refused at once; only a hub-shaped id is handed to the hub client."""
    import transformers

    from distill.models import load_model, load_tokenizer

    calls = []

    def fake_from_pretrained(src, *args, **kwargs):
        calls.append(src)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    for missing in (str(tmp_path / "no_such_dir"), "./no_such_dir", "~/no_such_dir_xyz", "runs/a/b"):
        with pytest.raises(DistillError, match="does not exist") as err:
            load_model(missing, what="teacher", device="cpu")
        assert "\n" not in str(err.value)
        with pytest.raises(DistillError, match="does not exist"):
            load_tokenizer(missing, what="teacher")
    assert calls == []
    with pytest.raises(DistillError, match="teacher org/model does not load: offline"):
        load_model("org/model", what="teacher", device="cpu")
    assert calls == ["org/model"]


def test_a_cache_without_any_completion_token_is_refused(tmp_path, tiny_model_dir, data, capsys):
    """Prompts longer than --max-length leave no trained position: the build refuses instead of writing a
    cache on which every training step has loss 0."""
    out = tmp_path / "cache"
    code, _, err = _run(capsys, _build_args(tiny_model_dir, data, out, "--max-length", "4"))
    _assert_one_line_error(code, err, "none of the 5 sequences", "--max-length 4")
    assert not out.exists()
