"""Synthetic word problems (deterministic, worked solutions that compute their answer) and GSM8K loading."""

from __future__ import annotations

import ast
import json
import operator
import re

import pytest

from distill.data.gsm8k import gold_answer, load_gsm8k
from distill.data.synthetic import synthetic_problems, write_jsonl
from distill.errors import DistillError
from distill.data.problems import load_problems
from teachers.verify import answers_match, extract_answer

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(expr: str):
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def test_deterministic_and_prefix_stable():
    a = synthetic_problems(30, seed=7)
    assert a == synthetic_problems(30, seed=7)
    assert synthetic_problems(10, seed=7) == a[:10]
    assert a != synthetic_problems(30, seed=8)
    assert len({p["id"] for p in a}) == 30


@pytest.mark.parametrize("min_steps,max_steps", [(2, 4), (1, 1), (3, 5)])
def test_worked_solutions_compute_their_answer(min_steps, max_steps):
    for p in synthetic_problems(150, seed=1, min_steps=min_steps, max_steps=max_steps):
        lines = p["answer"].split("\n")
        assert lines[-1].startswith("#### ")
        answer = int(lines[-1][5:])
        calcs = re.findall(r"<<([^=>]+)=(-?\d+)>>(-?\d+)", p["answer"])
        assert min_steps <= len(calcs) == len(lines) - 1 <= max_steps, p
        for expr, result, shown in calcs:
            value = _eval(expr)
            assert value == int(result) == int(shown), (expr, result)  # exact: divisions come out whole
            assert int(result) >= 0
        assert int(calcs[-1][1]) == answer
        assert gold_answer(p["answer"]) == str(answer)
        assert answers_match(extract_answer(p["answer"]), str(answer))
        assert p["question"].rstrip().endswith("?")


def test_templates_vary():
    problems = synthetic_problems(200, seed=0)
    kinds = {k for p in problems for k in ("does each get?", "How many dollars", "have now?") if k in p["question"]}
    assert len(kinds) == 3  # share, sell / pack, count
    questions = " ".join(p["question"] for p in problems)
    for phrase in ("shares", "sells", "gives", "each day", "more"):
        assert phrase in questions
    assert len({p["question"].split(" ")[0] for p in problems}) >= 8  # many people


def test_bad_arguments():
    with pytest.raises(DistillError):
        synthetic_problems(0)
    with pytest.raises(DistillError):
        synthetic_problems(3, min_steps=4, max_steps=2)


def test_write_jsonl_round_trip_and_load_problems(tmp_path):
    problems = synthetic_problems(4, seed=2)
    path = write_jsonl(problems, tmp_path / "sub" / "p.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == problems
    assert load_problems(str(path)) == problems
    assert load_problems("synthetic:4:2") == problems
    assert load_problems("synthetic:4:2", limit=2) == problems[:2]
    assert load_problems("synthetic:3:2:1") == synthetic_problems(3, seed=2, min_steps=1, max_steps=1)
    assert load_problems("synthetic:3:0:1-2") == synthetic_problems(3, seed=0, min_steps=1, max_steps=2)
    for bad in ("synthetic:x", "synthetic:3:0:a", "synthetic:3:0:1-2-3", "synthetic:3:0:1:9"):
        with pytest.raises(DistillError, match="bad data spec"):
            load_problems(bad)


GSM8K_ROWS = [
    {"question": "Janet's ducks lay 16 eggs per day. ...", "answer": "She makes 9 * 2 = $<<9*2=18>>18.\n#### 18"},
    {"question": "A robe takes 2 bolts ...", "answer": "2+1=<<2+1=3>>3 bolts\n#### 3"},
    {"question": "Johnny picks up blocks ...", "answer": "500+1500+125=<<500+1500+125=2125>>2125\n#### 2,125"},
]


def test_load_gsm8k_local_file_and_directory(tmp_path):
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    from_dir = load_gsm8k("test", path=tmp_path)
    assert [p["id"] for p in from_dir] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]
    assert from_dir[0]["question"] == GSM8K_ROWS[0]["question"] and from_dir[2]["answer"] == GSM8K_ROWS[2]["answer"]
    assert load_gsm8k("test", path=tmp_path / "test.jsonl", limit=2) == from_dir[:2]
    assert [gold_answer(p["answer"]) for p in from_dir] == ["18", "3", "2125"]
    assert gold_answer("42") == "42"
    assert gold_answer("x #### 2,125") == "2125" and gold_answer("x #### (1, 2)", keep_commas=True) == "(1, 2)"
    with pytest.raises(DistillError, match="not found"):
        load_gsm8k("train", path=tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DistillError, match="needs 'question' and 'answer'"):
        load_gsm8k("test", path=tmp_path / "bad.jsonl")


def test_load_gsm8k_offline_is_one_line_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DistillError) as err:
        load_gsm8k("test")
    assert "\n" not in str(err.value) and "openai/gsm8k" in str(err.value) and "local JSONL" in str(err.value)


def test_generate_and_bench_read_problems_through_one_grammar(tmp_path):
    """`teacher generate --data` and `bench --task` used two parsers: the benchmark refused a folder and
    column mappings, and `synthetic:N:SEED` meant nothing to it. Now both read `load_problems`."""
    from distill.bench.tasks import SYNTHETIC_SEED, load_task

    rows = [{"uid": f"p{i}", "problem": f"{i} + 1?", "solution": f"work\n#### {i + 1}"} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = {"question": "problem", "answer": "solution", "id": "uid"}
    for spec in (str(tmp_path), str(tmp_path / "test.jsonl"), "synthetic:4:7", "synthetic:3:7:1-2"):
        problems = load_problems(spec, split="test", fields=fields)
        bench, info = load_task(spec, split="test", fields=fields)
        assert [(b.id, b.question, b.gold) for b in bench] == [
            (p["id"], p["question"], gold_answer(p["answer"], keep_commas=True)) for p in problems]
        assert info["num_problems"] == len(problems)
    assert [p.id for p in load_task(str(tmp_path), fields=fields)[0]] == ["p0", "p1", "p2"]
    # a bare `synthetic` takes the caller's seed: the benchmark's is not the training problems'
    assert load_task("synthetic", limit=2)[0][0].question == synthetic_problems(2, SYNTHETIC_SEED)[0]["question"]
    assert load_problems("synthetic", limit=2) == synthetic_problems(2, 0)
    with pytest.raises(DistillError, match="has no train.jsonl"):
        load_problems(str(tmp_path))  # generation reads the training split by default
    with pytest.raises(DistillError, match="FIELD must be one of"):
        load_problems(str(tmp_path), split="test", fields={"solution": "x"})
    with pytest.raises(DistillError, match=r"problems not found: 'nope\.jsonl'"):
        load_task("nope.jsonl")
