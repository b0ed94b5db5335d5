"""The shared atomic writers leave no temporary file behind, and the JSONL reader names file:line."""

from __future__ import annotations

import json

import pytest

from distill.errors import DistillError
from distill.io import atomic_write_json, atomic_write_jsonl, iter_jsonl


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"b": 1, "a": 2}, sort_keys=True)
    atomic_write_json(target, {"b": 3}, indent=1)
    assert target.read_text() == '{\n "b": 3\n}\n'
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]
    (tmp_path / "dir.json").mkdir()  # os.replace onto a directory fails: the temporary file must go
    with pytest.raises(OSError):
        atomic_write_json(tmp_path / "dir.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "sub"]


def test_jsonl_round_trip_and_errors(tmp_path):
    path = atomic_write_jsonl(tmp_path / "r.jsonl", [{"q": "é"}, {"q": 2}])
    assert "é" in path.read_text(encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"q": "é"}), (2, {"q": 2})]
    bad = tmp_path / "bad.jsonl"
    for body, needle in ((b'{"a": 1}\n\n{oops\n', "bad.jsonl:3 is not valid JSON"),
                         (json.dumps([1]).encode() + b"\n", "bad.jsonl:1 is not a JSON object"),
                         (b'{"a": "\xff"}\n', "bad.jsonl:1 is not UTF-8")):
        bad.write_bytes(body)
        with pytest.raises(DistillError, match=needle) as err:
            list(iter_jsonl(bad))
        assert "\n" not in str(err.value)
    with pytest.raises(DistillError, match="cannot read"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


def test_atomic_directory_replaces_whole_or_keeps_old(tmp_path):
    from distill.io import atomic_directory

    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed mid-save")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["a.txt"]  # the old folder untouched
    with atomic_directory(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c.txt"]  # replaced whole, nothing merged
