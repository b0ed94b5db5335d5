"""Stored log-prob values, shared by every codec: the value dtypes, their rounding, and its bound.

fp16 / bf16: the fp32 log-prob rounded to nearest (clamped at LOGPROB_FLOOR first): |x' - x| <= u|x|
with u = 2^-11 (fp16) or 2^-8 (bf16).

q8: one byte per value, on a square-root grid: c = round(sqrt(-x) / h), clipped to 0..255, and
x' = -(c h)^2 with h = sqrt(Q8_FLOOR) / 255, Q8_FLOOR = 20 nats. Above the floor (x >= -20, p >= 2.1e-9)

    |x' - x| <= h sqrt(-x) + h^2 / 4          (h = 0.01754)

since |c h - sqrt(-x)| <= h/2 and |a^2 - b^2| = |a - b| (a + b). The grid is finest where the mass is:
0.0040 nats at p = 0.95 (0.4 % of p), 0.015 at p = 0.5, 0.030 at p = 0.05, 0.078 at the floor. Values
below the floor are stored as the floor (p' = 2.1e-9). The map is monotone, so sorted rows stay sorted,
and x = 0 is stored exactly.

The bound on how far rounding can push a row's probability mass past 1 is derived in `max_row_mass`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# safetensors dtype tag of each value dtype.
VALUE_DTYPES = {"fp16": "F16", "bf16": "BF16", "q8": "U8"}
# q8: square-root grid down to -Q8_FLOOR nats, step Q8_STEP in sqrt(-log p).
Q8_FLOOR = 20.0
Q8_STEP = math.sqrt(Q8_FLOOR) / 255.0
# Log-probs below this are clamped before storage: exp() is 0 in fp32 either way, and fp16 stays finite.
LOGPROB_FLOOR = -1.0e4
# Unit roundoff of round-to-nearest in each stored value dtype: |stored - exact| <= u * |exact|.
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
# Relative error of the fp32 log-softmax the values come from (shared normaliser + per-entry rounding),
# generous for scaled logits |z/T| up to a few thousand.
FP32_SLACK = 1e-3


def check_value_dtype(value_dtype: str) -> str:
    from distill.errors import DistillError

    if value_dtype not in VALUE_DTYPES:
        raise DistillError(f"--dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
    return value_dtype


def value_bits(value_dtype: str) -> int:
    return 8 if value_dtype == "q8" else 16


def store_values(lp: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """fp32 log-probs -> the stored tensor (contiguous) of `value_dtype`."""
    if value_dtype == "q8":
        y = torch.sqrt(torch.clamp(-lp.float(), min=0.0)) / Q8_STEP
        return torch.clamp(torch.round(y), max=255).to(torch.uint8).contiguous()
    val_t = torch.float16 if value_dtype == "fp16" else torch.bfloat16
    return lp.float().clamp_min(LOGPROB_FLOOR).to(val_t).contiguous()


def load_values(tag: str, arr: np.ndarray) -> torch.Tensor:
    """Stored values (a slice of a memory-mapped shard tensor) -> fp32 torch tensor (a copy)."""
    raw = np.array(arr, copy=True)
    if tag == "U8":
        y = torch.from_numpy(raw.astype(np.float32)) * Q8_STEP
        return -(y * y)
    if tag == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw.astype(np.float32))


def values_fp32(tag: str, arr: np.ndarray) -> np.ndarray:
    """Stored values -> fp32 numpy (verify)."""
    if tag == "U8":
        y = np.asarray(arr, dtype=np.float32) * np.float32(Q8_STEP)
        return -(y * y)
    if tag == "BF16":
        return (np.asarray(arr).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)


def max_row_mass(k: int, value_dtype: str) -> float:
    """The largest sum of exp(stored log-prob) over a row of k values that rounding alone can produce.

    Exact probabilities of k distinct tokens sum to at most 1. A stored value is the fp32 log-prob
    x <= 0 rounded to nearest in the value dtype, with unit roundoff u (fp16 2^-11, bf16 2^-8):
    |x' - x| <= u|x| while x is a normal number, so x' <= (1 - u) x and p' = exp(x') <= p^(1-u). Under
    sum p_i <= 1 the sum of p_i^(1-u) is largest when the k probabilities are equal (t -> t^(1-u) is
    concave): k * k^-(1-u) = k^u (bf16: 1.0164 at k = 64, 1.0275 at k = 1,024; fp16: 1.0020 at k = 64).
    The exceptions stay far inside FP32_SLACK: an fp16 subnormal (|x| < 2^-14, p > 0.99993) has an
    absolute error <= 2^-25, i.e. p' <= p * (1 + 3e-8); bf16 subnormals lie below 1e-38; the clamp at
    LOGPROB_FLOOR (-10,000) only raises values whose exp is 0 in float64. The fp32 values themselves
    carry the error of the log-softmax that made them (FP32_SLACK).

    q8: each stored p' <= p exp(h sqrt(l) + h^2/4), l = -log p (above the floor). g(l) = exp(h sqrt(l))
    is concave for sqrt(l) < 1/h = 57, i.e. on the whole grid, so by Jensen sum_i p_i g(l_i) <= S g(sum_i
    (p_i/S) l_i) with S = sum p_i <= 1, and the mean of l under p/S is at most log k - log S (the entropy
    of k outcomes). S g(log k - log S) grows with S, so the sum is at most exp(h sqrt(log k) + h^2/4)
    (1.0297 at k = 16, 1.0365 at k = 64); each of the k values clamped up to the floor adds at most
    exp(-20).
    """
    if value_dtype == "q8":
        h = Q8_STEP
        return (math.exp(h * math.sqrt(math.log(max(1, k))) + h * h / 4) + k * math.exp(-Q8_FLOOR)) * (1.0 + FP32_SLACK)
    u = UNIT_ROUNDOFF.get(value_dtype, UNIT_ROUNDOFF["bf16"])
    return float(max(1, k)) ** u * (1.0 + FP32_SLACK)


def value_error_bound(lp: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """The documented bound on |stored - exact| for exact log-probs `lp` (<= 0), elementwise."""
    x = lp.double()
    if value_dtype == "q8":
        h = Q8_STEP
        inside = h * torch.sqrt(torch.clamp(-x, min=0.0)) + h * h / 4
        return torch.where(x >= -Q8_FLOOR, inside, (x + Q8_FLOOR).abs() + inside.new_tensor(h * h / 4))
    floor_gap = torch.clamp(LOGPROB_FLOOR - x, min=0.0)  # clamped values move up to the floor
    return UNIT_ROUNDOFF[value_dtype] * x.abs() + floor_gap
