"""Step-level scoring: split a reasoning trace into steps, score every step given what came before,
aggregate the step scores into one weight.

An outcome scorer judges a whole trace; a step-level (process) scorer judges each step, so that one
wrong step sinks a trace whose ending looks confident (aggregate `min`), or a search can prune a
branch as soon as a step goes wrong (`distill.bench.search`).

Steps (`split_steps`, `--steps`):
- ``lines``       every line (blank lines join the step before them);
- ``step-k``      a new step at every line that starts with "Step k" (text before the first one is a step);
- ``paragraphs``  blocks separated by blank lines inside <think> ... </think>; everything from </think>
                  on (the final answer) is one more step; without <think>, the paragraphs of the text;
- ``auto``        step-k when the trace has two such markers, else paragraphs when it has two, else lines.

Steps are character spans that tile the text (step k+1 starts where step k ends), so every token of a
tokenized trace belongs to exactly one step: the one holding its first character.

Step scores are in (0, 1]: the teacher's exp(mean log-prob of the step's tokens) given the prompt and
all earlier steps (one prefill scores every prefix at once: attention is causal), or a trained step
scorer's probability that the prefix ending with the step is still on a correct path (one pass per
prefix). `aggregate` (`--step-aggregate`): `min` (the weakest step), `product` (all steps right),
`last` (the scorer's view of the whole prefix, as a step-trained classifier reads it).
"""

from __future__ import annotations

import bisect
import math
import re
from typing import Sequence

STEP_MODES = ("auto", "lines", "step-k", "paragraphs")
AGGREGATES = ("min", "product", "last")

_STEP_K = re.compile(r"(?im)^[ \t]*(?:\*\*)?step[ \t]*\d+")
_BLANK = re.compile(r"\n[ \t]*\n\s*")


def _tile(text: str, starts: list[int]) -> list[tuple[int, int]]:
    """Spans from sorted start offsets: the first starts at 0, the last ends at len(text)."""
    cuts = sorted({s for s in starts if 0 < s < len(text)})
    bounds = [0] + cuts + [len(text)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _line_starts(text: str) -> list[int]:
    starts = []
    for m in re.finditer("\n", text):
        a = m.end()
        b = text.find("\n", a)
        if a < len(text) and text[a:len(text) if b < 0 else b].strip():
            starts.append(a)  # a blank line joins the step before it
    return starts


def _paragraph_starts(text: str, lo: int, hi: int) -> list[int]:
    return [m.end() for m in _BLANK.finditer(text, lo, hi) if m.end() < hi]


def split_steps(text: str, mode: str = "auto") -> list[tuple[int, int]]:
    """The steps of `text` as (start, end) character spans that tile it (see the module docstring)."""
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r}")
    if not text:
        return []
    if mode == "auto":
        if len(_STEP_K.findall(text)) >= 2:
            mode = "step-k"
        elif len(split_steps(text, "paragraphs")) >= 2:
            mode = "paragraphs"
        else:
            mode = "lines"
    if mode == "lines":
        return _tile(text, _line_starts(text))
    if mode == "step-k":
        return _tile(text, [m.start() for m in _STEP_K.finditer(text)])
    open_at, close_at = text.find("<think>"), text.find("</think>")
    if open_at >= 0:
        body_lo = open_at + len("<think>")
        body_hi = close_at if close_at > body_lo else len(text)
        starts = _paragraph_starts(text, body_lo, body_hi)
        if close_at > body_lo:
            starts.append(close_at)
        return _tile(text, starts)
    return _tile(text, _paragraph_starts(text, 0, len(text)))


def token_steps(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """The step index of every token: the step that holds the token's first character."""
    starts = [a for a, _ in spans]
    return [max(0, bisect.bisect_right(starts, a) - 1) for a, _ in offsets]


def step_scores_from_logprobs(logprobs: Sequence[float], offsets: Sequence[tuple[int, int]],
                              spans: Sequence[tuple[int, int]]) -> list[float]:
    """exp(mean log-prob) of each step's tokens (a step without a token of its own is skipped)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for lp, k in zip(logprobs, token_steps(offsets, spans)):
        sums[k] = sums.get(k, 0.0) + float(lp)
        counts[k] = counts.get(k, 0) + 1
    return [math.exp(min(0.0, sums[k] / counts[k])) for k in sorted(sums)]


def aggregate(scores: Sequence[float], how: str) -> float:
    """One weight from step scores in [0, 1]: min, product or last; 0 when there is no step."""
    if how not in AGGREGATES:
        raise ValueError(f"unknown step aggregate {how!r}")
    if not scores:
        return 0.0
    if how == "min":
        return float(min(scores))
    if how == "last":
        return float(scores[-1])
    return float(math.prod(scores))
