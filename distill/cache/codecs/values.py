"""Stored log-prob values, shared by every codec: the value dtypes, their rounding, and its bound.

fp16 / bf16: the fp32 log-prob rounded to nearest (clamped at LOGPROB_FLOOR first). The bound on how far
rounding can push a row's probability mass past 1 is derived in `max_row_mass`.
"""

from __future__ import annotations

import numpy as np
import torch

# safetensors dtype tag of each value dtype.
VALUE_DTYPES = {"fp16": "F16", "bf16": "BF16"}
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


def store_values(lp: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """fp32 log-probs -> the stored tensor (contiguous) of `value_dtype`."""
    val_t = torch.float16 if value_dtype == "fp16" else torch.bfloat16
    return lp.float().clamp_min(LOGPROB_FLOOR).to(val_t).contiguous()


def load_values(tag: str, arr: np.ndarray) -> torch.Tensor:
    """Stored values (a slice of a memory-mapped shard tensor) -> fp32 torch tensor (a copy)."""
    raw = np.array(arr, copy=True)
    if tag == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw.astype(np.float32))


def values_fp32(tag: str, arr: np.ndarray) -> np.ndarray:
    """Stored values -> fp32 numpy (verify)."""
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
    """
    u = UNIT_ROUNDOFF.get(value_dtype, UNIT_ROUNDOFF["bf16"])
    return float(max(1, k)) ** u * (1.0 + FP32_SLACK)
