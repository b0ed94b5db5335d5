"""Benchmark tasks: GSM8K test, synthetic arithmetic word problems, or a user's JSONL file.

Every task yields `Problem(id, question, gold)` where `gold` is the final answer only (the text after
the last `####` of a GSM8K-style worked answer, or the whole answer when it has no `####`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from distill.data.gsm8k import gold_answer, load_gsm8k
from distill.errors import DistillError
from distill.io import iter_jsonl

# Synthetic problems for the benchmark use their own seed so that they are not the problems a
# pipeline trained on by default (its synthetic data uses small seeds); recorded in results.json.
SYNTHETIC_SEED = 90_210
DEFAULT_SYNTHETIC_COUNT = 50


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str


def _from_records(records, source: str) -> list[Problem]:
    problems = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
            raise DistillError(f"{source}: record {i + 1} needs 'question' and 'answer' fields")
        gold = gold_answer(rec["answer"], keep_commas=True)
        if not gold:
            raise DistillError(f"{source}: record {i + 1} has an empty answer")
        problems.append(Problem(id=str(rec.get("id", i)), question=str(rec["question"]), gold=gold))
    return problems


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    return [row for _, row in itertools.islice(iter_jsonl(path), limit)]


def load_task(task: str, *, limit: int | None = None, seed: int = SYNTHETIC_SEED) -> tuple[list[Problem], dict]:
    """Problems of `task` (gsm8k | synthetic | path to a JSONL file) and a description for results.json."""
    if limit is not None and limit < 1:
        raise DistillError(f"--limit must be at least 1, got {limit}")
    if task == "gsm8k":
        records = load_gsm8k("test", limit=limit)
        problems = _from_records(records, "gsm8k test")
        info = {"task": "gsm8k", "split": "test"}
    elif task == "synthetic":
        from distill.data.synthetic import synthetic_problems

        n = limit or DEFAULT_SYNTHETIC_COUNT
        problems = _from_records(synthetic_problems(n, seed), "synthetic")
        info = {"task": "synthetic", "seed": seed}
    else:
        path = Path(task)
        if not path.exists():
            raise DistillError(f"unknown task {task!r}: use gsm8k, synthetic, or a JSONL file with question/answer fields")
        if path.is_dir():
            raise DistillError(f"task {task} is a directory; pass a JSONL file with question/answer fields")
        problems = _from_records(_read_jsonl(path, limit), str(path))
        info = {"task": "file", "path": str(path.resolve())}
    if limit is not None:
        problems = problems[:limit]
    if not problems:
        raise DistillError(f"task {task!r} has no problems")
    info["num_problems"] = len(problems)
    return problems, info
