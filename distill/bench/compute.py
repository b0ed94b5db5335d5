"""Accuracy at equal compute: what each selection rule spent per problem, in tokens.

Every rule reports, at each sample count n of the grid, the mean per problem of the tokens the
generating model produced (the first n samples; greedy: its one completion) and of the tokens its
scorers processed for those samples (prompt and completion of a reward model's or the teacher's
prefill; 0 for `self`, which comes free with sampling). Plotting accuracy against their sum puts
maj@N, best-of-N with a teacher verifier and greedy on one axis: a verifier that reads 300 teacher
tokens per sample is not free, and the curve says whether it beats drawing more samples instead.

Tokens are counted, not weighted by model size: a teacher token costs more FLOPs than a student
token, and `results.json` keeps the two counts apart so that a reader can weigh them.
"""

from __future__ import annotations

from typing import Sequence


def compute_points(curve: dict, generated: Sequence[Sequence[int]], scorer: Sequence[Sequence[int]],
                   grid: Sequence[int]) -> list[dict]:
    """One point per n (key "samples"; "n" is the accuracy entry's problem count): mean generated / scorer / total tokens per problem (first n samples) with the
    accuracy entry `curve[str(n)]`."""
    problems = max(1, len(generated))
    points = []
    for n in grid:
        gen = sum(sum(row[:n]) for row in generated) / problems
        sc = sum(sum(row[:n]) for row in scorer) / problems
        points.append({"samples": n, "generated_tokens": gen, "scorer_tokens": sc, "total_tokens": gen + sc,
                       **curve[str(n)]})
    return points
