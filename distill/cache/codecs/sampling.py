"""Seeded draws from a teacher row, identical whatever the batch, the process or the resume point.

Every row's randomness comes from a counter-based generator keyed by (codec seed, sample index,
position): draw d of a row uses splitmix64 of (row key, d). Nothing depends on a global generator,
the order rows are scored in, or how they are batched, so a resumed or multi-process build writes
the same bytes as a single uninterrupted one.

Two samplers, both inverse CDF, named by the codec parameter `sampler` (a cache is resumed with the
sampler that started it, so its bytes never mix the two):

1  `draw`: a float64 cumulative sum over the whole row (the first caches). Exact up to float64
   rounding, but on a 135M teacher the cumulative sum over 49,152 columns costs ~7-15 % of the build.
2  `draw_blocked` (the default): two levels. The row's fp32 weights are summed in blocks of
   BLOCK columns; a draw picks its block by inverse CDF over the float64 cumulative sum of the block
   sums, then its id inside the block by inverse CDF over that block's float64 cumulative sum. Only
   one pass over the row (the block sums, a vectorised fp32 reduction) plus n x BLOCK columns per row.
   Exact for the fp32 weights up to the rounding of an fp32 block sum (relative ~1e-7 per block,
   below the fp32 rounding of the teacher's logits themselves).
"""

from __future__ import annotations

import numpy as np
import torch

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# float64 cumsum of at most this many elements at a time (128 MiB)
_CDF_ELEMENTS = 1 << 24
# columns per block of draw_blocked: sqrt of the vocabulary over n is optimal, 128 is close for
# V = 49,152..262,144 and n = 8..32 (and a power of two keeps the block sums one strided reduction)
BLOCK = 128
# the samplers by the codec parameter `sampler` (1: caches built before sampler 2 existed)
SAMPLERS = (1, 2)
DEFAULT_SAMPLER = 2


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


def draw_blocked(w: torch.Tensor, u: np.ndarray, block: int = BLOCK) -> torch.Tensor:
    """Ids drawn from each row's distribution proportional to the fp32 weights w >= 0 (0 = excluded), one
    per uniform: [C, V] weights and [C, n] uniforms -> [C, n] int64 ids. Rows with no mass give id 0.

    Block b of a row is picked with probability S_b / sum S (S_b its fp32 sum), then id i of the block
    with probability w_i / (the block's float64 sum): P(i) = w_i / sum w up to the rounding of S_b."""
    C, V = w.shape
    n = u.shape[1]
    if C == 0:
        return torch.zeros((0, n), dtype=torch.int64)
    w = w.float().contiguous()
    full = V // block
    sums = [w[:, :full * block].view(C, full, block).sum(-1)] if full else []
    if V > full * block:
        sums.append(w[:, full * block:].sum(-1, keepdim=True))
    bsum = torch.cat(sums, 1).double()  # [C, nb]
    nb = bsum.shape[1]
    cdf = torch.cumsum(bsum, 1)
    total = cdf[:, -1:]
    uu = torch.from_numpy(np.ascontiguousarray(u)).to(torch.float64)
    # u < 1, but u * total may round up to total: keep the target strictly below it
    target = torch.minimum(uu * total, total * (1.0 - 2.0 ** -52))
    blk = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=nb - 1)  # [C, n]
    before = torch.where(blk > 0, cdf.gather(1, (blk - 1).clamp(min=0)), 0.0)
    width = cdf.gather(1, blk) - before
    frac = torch.where(width > 0, (target - before) / width, 0.0).clamp_(0.0, 1.0)
    # the chosen blocks' columns: [C, n, block]; past the last column, weight 0
    cols = blk.unsqueeze(-1) * block + torch.arange(block)
    inside = cols < V
    vals = w.gather(1, cols.clamp(max=V - 1).view(C, -1)).view(C, n, block).double()
    icdf = torch.cumsum(torch.where(inside, vals, 0.0), -1)
    itotal = icdf[..., -1:]
    itarget = torch.minimum(frac.unsqueeze(-1) * itotal, itotal * (1.0 - 2.0 ** -52))
    j = torch.searchsorted(icdf, itarget.contiguous(), right=True).clamp_(max=block - 1).squeeze(-1)
    ids = (blk * block + j).clamp_(max=V - 1)
    return torch.where(total > 0, ids, 0)


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
