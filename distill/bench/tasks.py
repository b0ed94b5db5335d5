"""Benchmark tasks: the problems of `distill.data.problems.load_problems` (one grammar for
`distill teacher generate --data` and `distill bench --task`), with the final answer split off.

Every task yields `Problem(id, question, gold)` where `gold` is the final answer only (the text after
the last `####` of a GSM8K-style worked answer, or the whole answer when it has no `####`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from distill.data.gsm8k import gold_answer
from distill.data.problems import describe_source, load_problems
from distill.errors import DistillError

# Synthetic problems for the benchmark use their own seed so that they are not the problems a
# pipeline trained on by default (its synthetic data uses small seeds); recorded in results.json.
SYNTHETIC_SEED = 90_210


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str


def load_task(task: str, *, limit: int | None = None, split: str = "test", fields: Mapping[str, str] | None = None,
              seed: int = SYNTHETIC_SEED) -> tuple[list[Problem], dict]:
    """Problems of `task` and a description for results.json; a bare `synthetic` uses the bench seed."""
    records = load_problems(task, split=split, fields=fields, limit=limit, synthetic_seed=seed)
    problems = []
    for i, rec in enumerate(records):
        gold = gold_answer(rec["answer"], keep_commas=True)
        if not gold:
            raise DistillError(f"task {task}: problem {rec['id']} (record {i + 1}) has an empty answer")
        problems.append(Problem(id=rec["id"], question=rec["question"], gold=gold))
    info = describe_source(task, split=split, limit=limit, synthetic_seed=seed)
    info["num_problems"] = len(problems)
    return problems, info
