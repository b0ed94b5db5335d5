"""Small statistics for the benchmark: Wilson score intervals and expected calibration error.

Wilson rather than the normal approximation because benchmark accuracies sit near 0 or 1 on small
problem sets (20 synthetic problems, a tiny model at 0%), where p +- 1.96*sqrt(p(1-p)/n) collapses to
a zero-width interval or leaves [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0 (nothing is known)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no 1e-17 rounding residue
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def accuracy_entry(successes: int, n: int) -> dict:
    """The JSON record of one accuracy figure: counts, rate and its 95% Wilson interval."""
    lo, hi = wilson_interval(successes, n)
    return {"correct": int(successes), "n": int(n), "acc": (successes / n) if n else 0.0, "ci95": [lo, hi]}


@dataclass
class CalibrationBins:
    """Streaming expected calibration error over equal-width confidence bins.

    Feed (confidence, hit) pairs batch by batch with `update`; `ece()` is
    sum_b |acc_b - conf_b| * n_b / N. Streaming so that held-out evaluation never keeps per-token
    arrays of a large cache in memory.
    """

    num_bins: int = 10
    count: list = field(default_factory=list)
    conf_sum: list = field(default_factory=list)
    hit_sum: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.count:
            self.count = [0] * self.num_bins
            self.conf_sum = [0.0] * self.num_bins
            self.hit_sum = [0.0] * self.num_bins

    def update(self, confidence, hit) -> None:
        """Add confidences in [0, 1] and 0/1 hits (torch tensors or sequences of equal length)."""
        try:
            import torch

            if isinstance(confidence, torch.Tensor):
                conf = confidence.detach().double().flatten()
                hits = torch.as_tensor(hit).detach().double().flatten()
                idx = torch.clamp((conf * self.num_bins).long(), 0, self.num_bins - 1)
                cnt = torch.bincount(idx, minlength=self.num_bins)
                cs = torch.bincount(idx, weights=conf, minlength=self.num_bins)
                hs = torch.bincount(idx, weights=hits, minlength=self.num_bins)
                for b in range(self.num_bins):
                    self.count[b] += int(cnt[b])
                    self.conf_sum[b] += float(cs[b])
                    self.hit_sum[b] += float(hs[b])
                return
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass
        for c, h in zip(confidence, hit):
            b = min(self.num_bins - 1, max(0, int(float(c) * self.num_bins)))
            self.count[b] += 1
            self.conf_sum[b] += float(c)
            self.hit_sum[b] += float(h)

    @property
    def total(self) -> int:
        return sum(self.count)

    def ece(self) -> float:
        n = self.total
        if n == 0:
            return float("nan")
        return sum(abs(self.hit_sum[b] - self.conf_sum[b]) for b in range(self.num_bins)) / n

    def mean_confidence(self) -> float:
        return sum(self.conf_sum) / self.total if self.total else float("nan")

    def accuracy(self) -> float:
        return sum(self.hit_sum) / self.total if self.total else float("nan")


def expected_calibration_error(confidences, hits, num_bins: int = 10) -> float:
    """ECE of one set of predictions (see `CalibrationBins`)."""
    bins = CalibrationBins(num_bins)
    bins.update(confidences, hits)
    return bins.ece()
