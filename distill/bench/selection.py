"""Test-time selection rules: turn N sampled answers to one problem into one final answer.

Every rule sees the same `Sample` list, in sampling order, and returns the chosen normalised
answer (or None when nothing parsable was produced, which counts as wrong). Rules:

- ``greedy``            the single temperature-0 completion (computed by the runner, not here).
- ``pass@N``            oracle: correct if ANY of the N samples is correct (an upper bound, not a
                        deployable rule; reported because it bounds what a perfect selector could get).
- ``majority`` (maj@N)  the most frequent normalised answer among parsable samples (self-consistency).
- ``best-of-n``         the answer of the single highest-scored parsable sample.
- ``weighted-best-of-n`` scores summed per distinct normalised answer; the largest sum wins.
- ``beam``, ``mcts``    searches over steps guided by a step scorer (`distill.bench.search`), run by the
                        runner with the model; one answer per problem, not a rule over the N samples.

Only samples with a parsable answer take part in majority / best-of-n / weighted: an unparsable
completion has no answer to vote for, and a reward model that likes a rambling unfinished trace
should not make the problem unanswerable when a parsable sample exists. No parsable sample -> None.

Deterministic tie-breaking (so a run is reproducible and tests can pin it): among tied answers (equal
count, equal score, equal summed score) the answer whose FIRST occurrence comes earliest in sampling
order wins. Sampling order is fixed by the seed, so ties resolve the same way on every run.

Scores must be non-negative weights for the weighted rule to mean anything (a sum of negative
log-probs would penalise popular answers); `scorers.py` maps raw scores to (0, 1] weights.

Accuracy at n < N uses the first n samples (a prefix), for every rule alike, so the accuracy-vs-N
curves of different rules are computed on the same samples and are directly comparable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

RULES = ("greedy", "pass@n", "majority", "best-of-n", "weighted-best-of-n", "beam", "mcts")
# Rules that search over steps with a step scorer (distill.bench.search), one answer per problem.
SEARCH_RULES = ("beam", "mcts")
# Rules that need the N sampled completions (everything except greedy).
SAMPLED_RULES = ("pass@n", "majority", "best-of-n", "weighted-best-of-n")
# Rules that need a scorer.
SCORED_RULES = ("best-of-n", "weighted-best-of-n")
# User-facing spellings accepted by --select, mapped to canonical names.
ALIASES = {
    "greedy": "greedy",
    "pass@n": "pass@n",
    "pass": "pass@n",
    "majority": "majority",
    "maj": "majority",
    "maj@n": "majority",
    "best-of-n": "best-of-n",
    "bon": "best-of-n",
    "weighted-best-of-n": "weighted-best-of-n",
    "weighted": "weighted-best-of-n",
    "beam": "beam",
    "beam-search": "beam",
    "mcts": "mcts",
}


@dataclass(frozen=True)
class Sample:
    """One sampled completion, reduced to what selection needs."""

    answer: str | None  # normalised final answer, None when none could be parsed
    correct: bool  # answer matches the gold answer
    score: float = 0.0  # non-negative weight from the scorer (unused by majority / pass@n)


_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalise_answer(text: str | None) -> str | None:
    """Canonical form used to group equal answers: '1,000.00' / '$1000' / '1000.' -> '1000'.

    Numbers become an exact reduced form (Fraction, so 0.5 and .50 agree and no float rounding merges
    distinct answers); anything else is lower-cased with surrounding spaces and punctuation removed.
    """
    if text is None:
        return None
    s = text.strip().lower()
    s = s.replace(",", "").replace("$", "").replace("%", "").strip()
    s = s.rstrip(".").strip()
    if not s:
        return None
    if _NUM.match(s):
        try:
            f = Fraction(s)
        except (ValueError, ZeroDivisionError):
            return s
        return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    return s


def canonical_rules(spec: str | Sequence[str]) -> list[str]:
    """Parse a comma-separated --select value into canonical rule names (order kept, no repeats)."""
    from distill.errors import DistillError

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        key = raw.strip().lower()
        if not key:
            continue
        if key not in ALIASES:
            raise DistillError(
                f"unknown selection rule {raw.strip()!r}: use a comma-separated subset of "
                "greedy,pass@n,majority,best-of-n,weighted-best-of-n,beam,mcts"
            )
        name = ALIASES[key]
        if name not in out:
            out.append(name)
    if not out:
        raise DistillError("--select is empty: name at least one of greedy,pass@n,majority,best-of-n,weighted-best-of-n")
    return out


def _first_seen_order(samples: Sequence[Sample]) -> dict[str, int]:
    order: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.answer is not None and s.answer not in order:
            order[s.answer] = i
    return order


def _argmax_by(values: dict[str, float], first_seen: dict[str, int]) -> str | None:
    """Key with the largest value; ties go to the key seen first in sampling order."""
    if not values:
        return None
    return min(values, key=lambda a: (-values[a], first_seen[a]))


def select_majority(samples: Sequence[Sample]) -> str | None:
    """maj@N: most frequent parsable answer; ties -> first seen."""
    counts: dict[str, float] = {}
    for s in samples:
        if s.answer is not None:
            counts[s.answer] = counts.get(s.answer, 0) + 1
    return _argmax_by(counts, _first_seen_order(samples))


def select_best_of_n(samples: Sequence[Sample]) -> str | None:
    """Answer of the highest-scored parsable sample; ties -> earliest sample."""
    best: Sample | None = None
    for s in samples:
        if s.answer is None:
            continue
        if best is None or s.score > best.score:  # strict: an equal later score never replaces
            best = s
    return None if best is None else best.answer


def select_weighted(samples: Sequence[Sample]) -> str | None:
    """Weighted best-of-N: sum of scores per distinct answer; ties -> first seen."""
    sums: dict[str, float] = {}
    for s in samples:
        if s.answer is not None:
            sums[s.answer] = sums.get(s.answer, 0.0) + float(s.score)
    return _argmax_by(sums, _first_seen_order(samples))


_SELECTORS: dict[str, Callable[[Sequence[Sample]], str | None]] = {
    "majority": select_majority,
    "best-of-n": select_best_of_n,
    "weighted-best-of-n": select_weighted,
}


def is_correct(rule: str, samples: Sequence[Sample]) -> bool:
    """Whether `rule` applied to `samples` yields a correct answer (pass@n: any sample correct)."""
    if rule == "pass@n":
        return any(s.correct for s in samples)
    if rule not in _SELECTORS:
        raise ValueError(f"rule {rule!r} is not a sampled selection rule")
    chosen = _SELECTORS[rule](samples)
    if chosen is None:
        return False
    # Correctness of the chosen answer: every sample with that normalised answer shares it.
    return any(s.correct for s in samples if s.answer == chosen)


def n_grid(n_max: int) -> list[int]:
    """Sample counts at which accuracy is reported: 1, 2, 4, ... and n_max itself."""
    grid, n = [], 1
    while n < n_max:
        grid.append(n)
        n *= 2
    grid.append(n_max)
    return grid


def accuracy_curves(
    per_problem: Sequence[Sequence[Sample]], rules: Sequence[str], grid: Sequence[int]
) -> dict[str, dict[int, int]]:
    """Number of problems solved by each rule using the first n samples, for each n in `grid`."""
    out: dict[str, dict[int, int]] = {}
    for rule in rules:
        out[rule] = {n: sum(is_correct(rule, samples[:n]) for samples in per_problem) for n in grid}
    return out
