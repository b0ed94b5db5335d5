"""GSM8K problems from a local JSONL copy or the Hugging Face hub (`openai/gsm8k`, config `main`).

Every record is `{"id", "question", "answer"}` where `answer` is GSM8K's worked solution whose last
line is `#### <number>`; `gold_answer` extracts that number. Ids are `gsm8k-{split}-{index}` so that
traces, caches and evaluations of the same problem line up across runs.
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.io import iter_jsonl

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"


def gold_answer(answer_text: str, *, keep_commas: bool = False) -> str:
    """The final answer of a GSM8K solution (text after the last `####`), commas removed.

    Text without `####` is taken as the answer itself (bare answers from generic data sets).
    `keep_commas=True` is for user task files whose answers need not be numbers (`(1, 2)`): there a
    comma is part of the answer, and `answers_match` already reads `1,000` as 1000.
    """
    text = str(answer_text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    return text if keep_commas else text.replace(",", "")


def load_gsm8k(split: str = "test", path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """GSM8K `split` from `path` (a JSONL file, or a directory holding `{split}.jsonl`) or the hub."""
    if limit is not None and limit < 1:
        raise DistillError(f"limit must be at least 1 (got {limit})")
    rows = _read_local(split, Path(path)) if path is not None else _read_hub(split)
    problems = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        problems.append({"id": f"gsm8k-{split}-{i}", "question": row["question"], "answer": row["answer"]})
    return problems


def _read_local(split: str, path: Path) -> list[dict]:
    file = path / f"{split}.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise DistillError(f"GSM8K file not found: {file} (give a JSONL file or a directory with {split}.jsonl)")
    rows = []
    for lineno, row in iter_jsonl(file):
        if "question" not in row or "answer" not in row:
            raise DistillError(f"{file}:{lineno}: a GSM8K row needs 'question' and 'answer'")
        rows.append(row)
    return rows


def _read_hub(split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split)
    except Exception as err:  # offline, unknown split, missing package: one line for the user
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise DistillError(f"cannot load {HUB_ID} ({first}); pass a local JSONL path instead") from None
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]
