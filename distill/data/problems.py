"""Problems with reference answers, from one input grammar: the trace generator and the benchmark
read their `--data` / `--task` through `load_problems`, so a spec means the same thing to both.

    synthetic[:N[:SEED[:MIN-MAX]]]   N generated arithmetic word problems of MIN-MAX steps (default 2-4);
                                     N defaults to `limit` (or 50), SEED to the caller's `synthetic_seed`
    gsm8k[:SPLIT]                    openai/gsm8k from the Hugging Face hub (SPLIT defaults to `split`)
    FILE.jsonl                       one JSON object a line with `question` and `answer` (and `id`)
    DIR                              DIR/{split}.jsonl, e.g. a local GSM8K copy

Columns with other names are mapped with `fields` (`--field question=problem`, FIELD one of
FIELD_NAMES). A problem is `{"id", "question", "answer"}`; `answer` is a worked solution ending in
`#### n` (GSM8K) or a bare answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from distill.errors import DistillError
from distill.io import iter_jsonl

FIELD_NAMES = ("question", "answer", "id")
DEFAULT_SYNTHETIC_COUNT = 50
GRAMMAR = "synthetic[:N[:SEED[:MIN-MAX]]], gsm8k[:SPLIT], a JSONL file or a folder holding {split}.jsonl"


def load_problems(spec: str, *, split: str = "train", fields: Mapping[str, str] | None = None,
                  limit: int | None = None, synthetic_seed: int = 0) -> list[dict]:
    """The problems `spec` names (see the module docstring), at most `limit` of them, ids unique."""
    from distill.data import gsm8k, synthetic

    spec = str(spec)
    if limit is not None and limit < 1:
        raise DistillError(f"--limit must be at least 1, got {limit}")
    bad = [k for k in (fields or {}) if k not in FIELD_NAMES]
    if bad:
        raise DistillError(f"--field {bad[0]}=...: FIELD must be one of {', '.join(FIELD_NAMES)}")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n, seed, lo, hi = _synthetic_spec(spec, limit, synthetic_seed)
        problems = synthetic.synthetic_problems(n, seed=seed, min_steps=lo, max_steps=hi)
        return problems[:limit] if limit else problems
    if spec == "gsm8k" or spec.startswith("gsm8k:"):
        return gsm8k.load_gsm8k(split=spec.split(":", 1)[1] if ":" in spec else split, limit=limit)
    return _from_file(spec, split=split, fields=fields, limit=limit)


def describe_source(spec: str, *, split: str = "train", limit: int | None = None, synthetic_seed: int = 0) -> dict:
    """What `spec` reads, for a results file: {"task": synthetic|gsm8k|file, plus seed, split or path}."""
    spec = str(spec)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n, seed, lo, hi = _synthetic_spec(spec, limit, synthetic_seed)
        return {"task": "synthetic", "seed": seed, "steps": [lo, hi]}
    if spec == "gsm8k" or spec.startswith("gsm8k:"):
        return {"task": "gsm8k", "split": spec.split(":", 1)[1] if ":" in spec else split}
    path = Path(spec)
    return {"task": "file", "path": str((path / f"{split}.jsonl" if path.is_dir() else path).resolve())}


def _synthetic_spec(spec: str, limit: int | None, default_seed: int) -> tuple[int, int, int, int]:
    parts = spec.split(":")
    try:
        n = int(parts[1]) if len(parts) > 1 else (limit or DEFAULT_SYNTHETIC_COUNT)
        seed = int(parts[2]) if len(parts) > 2 else default_seed
        steps = parts[3].split("-") if len(parts) > 3 else ["2", "4"]
        lo, hi = int(steps[0]), int(steps[-1])
        if len(parts) > 4 or len(steps) > 2:
            raise ValueError
    except (ValueError, IndexError):
        raise DistillError(f"bad data spec {spec!r}: use synthetic[:N[:SEED[:MIN-MAX steps]]]") from None
    return n, seed, lo, hi


def _from_file(spec: str, *, split: str, fields: Mapping[str, str] | None, limit: int | None) -> list[dict]:
    path = Path(spec)
    if path.is_dir():
        if not (path / f"{split}.jsonl").is_file():
            raise DistillError(f"{path} has no {split}.jsonl (the folder form reads {{split}}.jsonl)")
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise DistillError(f"problems not found: {spec!r} is not a file or folder; use {GRAMMAR}")
    mapping = {name: name for name in FIELD_NAMES} | dict(fields or {})
    problems = []
    for lineno, row in iter_jsonl(path):
        for key in ("question", "answer"):
            if mapping[key] not in row:
                raise DistillError(f"{path}:{lineno}: no column {mapping[key]!r} "
                                   f"(map yours with --field {key}=COLUMN)")
        pid = row.get(mapping["id"], f"{path.stem}-{len(problems)}")
        problems.append({"id": str(pid), "question": str(row[mapping["question"]]),
                         "answer": str(row[mapping["answer"]])})
        if limit and len(problems) >= limit:
            break
    if not problems:
        raise DistillError(f"no problems in {path}")
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise DistillError(f"{path}: duplicate problem ids; give each row a unique id")
    return problems
