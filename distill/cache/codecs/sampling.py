"""Seeded draws from a teacher row, identical whatever the batch, the process or the resume point.

Every row's randomness comes from a counter-based generator keyed by (codec seed, sample index,
position): draw d of a row uses splitmix64 of (row key, d). Nothing depends on a global generator,
the order rows are scored in, or how they are batched, so a resumed or multi-process build writes
the same bytes as a single uninterrupted one. Draws are by inverse CDF on a float64 cumulative sum
of the row's probabilities (exact sampling up to float64 rounding, ~1e-16 of the row's mass).
"""

from __future__ import annotations

import numpy as np
import torch

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# float64 cumsum of at most this many elements at a time (128 MiB)
_CDF_ELEMENTS = 1 << 24


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(x, dtype=np.uint64) + _GOLDEN) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def row_seeds(seed: int, sample_index: int, positions) -> np.ndarray:
    """The key of each row: (codec seed, global sample index, position t) -> uint64."""
    pos = np.asarray(positions, dtype=np.uint64).reshape(-1)
    base = splitmix64(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))
    with np.errstate(over="ignore"):
        key = splitmix64(base ^ np.uint64(int(sample_index) & 0xFFFFFFFF) << np.uint64(32))
    return splitmix64(key ^ pos)


def uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """[C, n] float64 uniforms in [0, 1): draw d of row r from splitmix64(seed_r + d * golden)."""
    s = np.asarray(seeds, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        x = splitmix64(s ^ splitmix64(np.arange(1, n + 1, dtype=np.uint64))[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def draw(logp: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """Ids drawn from each row's distribution exp(logp) (unnormalised is fine; -inf = excluded), one per
    uniform: [C, V] log-weights and [C, n] uniforms -> [C, n] int64 ids. Rows with no mass give id 0."""
    C, V = logp.shape
    n = u.shape[1]
    out = torch.zeros((C, n), dtype=torch.int64, device=logp.device)
    rows = max(1, _CDF_ELEMENTS // max(V, 1))
    uu = torch.from_numpy(u).to(logp.device)
    for a in range(0, C, rows):
        lp = logp[a:a + rows].double()
        shift = lp.amax(dim=1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        cdf = torch.cumsum(torch.exp(lp - shift), dim=1)
        total = cdf[:, -1:]
        # u < 1, but u * total may round up to total: keep the target strictly below it
        target = torch.minimum(uu[a:a + rows] * total, total * (1.0 - 2.0 ** -52))
        idx = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=V - 1)
        out[a:a + rows] = torch.where(total > 0, idx, 0)
    return out


def unique_counts(draws: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the distinct drawn ids in increasing order, left-aligned in n_slots slots, and how many
    times each was drawn (0 in padded slots). draws [C, n] -> (ids [C, n_slots], counts [C, n_slots])."""
    C, n = draws.shape
    s, _ = torch.sort(draws, dim=1)
    new = torch.ones_like(s, dtype=torch.int64)
    new[:, 1:] = (s[:, 1:] != s[:, :-1]).long()
    slot = torch.cumsum(new, dim=1) - 1
    counts = torch.zeros((C, n_slots), dtype=torch.int64, device=draws.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    ids = torch.zeros((C, n_slots), dtype=torch.int64, device=draws.device)
    ids.scatter_(1, slot, s)
    return ids, counts
