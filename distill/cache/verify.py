"""Check a cache end to end: manifest, every shard's checksum, structure and value ranges.

`verify_cache` raises DistillError naming the first faulty shard; `distill cache verify` turns that into
exit code 1. Checks are vectorised so that verifying costs about one read of the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from distill.cache.format import (
    SHARD_TENSORS,
    T_INPUT_IDS,
    T_LOSS_MASK,
    T_ROW_OFFSETS,
    T_SEQ_OFFSETS,
    T_TOPK_IDS,
    T_TOPK_LOGPROBS,
    VALUE_DTYPES,
    mmap_safetensors,
    read_manifest,
)
from distill.errors import DistillError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _values_fp32(tag: str, arr: np.ndarray) -> np.ndarray:
    if tag == "BF16":
        return (np.asarray(arr).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)


# Unit roundoff of round-to-nearest in each stored value dtype: |stored - exact| <= u * |exact|.
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
# Relative error of the fp32 log-softmax the values come from (shared normaliser + per-entry rounding),
# generous for scaled logits |z/T| up to a few thousand.
FP32_SLACK = 1e-3


def max_topk_mass(k: int, value_dtype: str) -> float:
    """The largest sum of exp(stored log-prob) over a row of k values that rounding alone can produce.

    Exact top-k probabilities sum to at most 1. A stored value is the fp32 log-prob x <= 0 rounded to
    nearest in the value dtype, with unit roundoff u (fp16 2^-11, bf16 2^-8): |x' - x| <= u|x| while x is
    a normal number, so x' <= (1 - u) x and p' = exp(x') <= p^(1-u). Under sum p_i <= 1 the sum of
    p_i^(1-u) is largest when the k probabilities are equal (t -> t^(1-u) is concave): k * k^-(1-u) = k^u
    (bf16: 1.0164 at k = 64, 1.0275 at k = 1,024; fp16: 1.0020 at k = 64). The exceptions stay far
    inside FP32_SLACK: an fp16 subnormal (|x| < 2^-14, p > 0.99993) has an absolute error <= 2^-25,
    i.e. p' <= p * (1 + 3e-8); bf16 subnormals lie below 1e-38; the clamp at LOGPROB_FLOOR (-10,000)
    only raises values whose exp is 0 in float64. The fp32 values themselves carry the error of the
    log-softmax that made them (FP32_SLACK).
    """
    u = UNIT_ROUNDOFF.get(value_dtype, UNIT_ROUNDOFF["bf16"])
    return float(max(1, k)) ** u * (1.0 + FP32_SLACK)


def verify_cache(path: str | Path, *, allow_incomplete: bool = False) -> None:
    """Raise DistillError naming the faulty shard (or manifest problem); return None when the cache is sound."""
    path = Path(path)
    m = read_manifest(path)
    if not m.complete and not allow_incomplete:
        raise DistillError(f"cache {path} is incomplete ({m.num_cached_samples}/{m.num_samples} samples); rerun the build to finish it")
    id_tag = "U16" if m.id_dtype == "uint16" else "I32"
    val_tag = VALUE_DTYPES.get(m.value_dtype)
    covered = 0
    for s in sorted(m.shards, key=lambda s: s.start):
        if m.complete and s.start != covered:
            raise DistillError(f"manifest of {path}: shard {s.file} starts at sample {s.start}, expected {covered}")
        covered = s.end
        f = path / s.file

        def bad(why: str) -> DistillError:
            return DistillError(f"shard {s.file} is faulty: {why}; delete it and rerun the same build command to rewrite it")

        if not f.is_file():
            raise bad("file missing")
        size = f.stat().st_size
        if size != s.bytes:
            raise bad(f"{size} bytes on disk, manifest says {s.bytes} (truncated?)")
        if _sha256(f) != s.sha256:
            raise bad("sha256 checksum mismatch (corrupted bytes)")
        try:
            maps = mmap_safetensors(f)
        except DistillError as err:
            raise bad(str(err)) from None
        for t in SHARD_TENSORS:
            if t not in maps:
                raise bad(f"tensor {t!r} missing")
        n = s.end - s.start
        tag_ids, ids = maps[T_INPUT_IDS]
        _, mask = maps[T_LOSS_MASK]
        _, seq_off = maps[T_SEQ_OFFSETS]
        _, row_off = maps[T_ROW_OFFSETS]
        tag_tid, tid = maps[T_TOPK_IDS]
        tag_val, val = maps[T_TOPK_LOGPROBS]
        if tag_ids != id_tag or tag_tid != id_tag or tag_val != val_tag:
            raise bad(f"dtypes {tag_ids}/{tag_tid}/{tag_val}, manifest says {id_tag}/{val_tag}")
        if seq_off.shape != (n + 1,) or row_off.shape != (n + 1,):
            raise bad(f"offsets do not describe {n} samples")
        if seq_off[0] != 0 or row_off[0] != 0 or np.any(np.diff(seq_off) < 0) or np.any(np.diff(row_off) < 0):
            raise bad("offsets are not increasing from 0")
        if int(seq_off[-1]) != ids.shape[0] or mask.shape != ids.shape or int(seq_off[-1]) != s.num_tokens:
            raise bad("token count does not match offsets/manifest")
        if tid.ndim != 2 or tid.shape != val.shape or tid.shape[1] != m.k or tid.shape[0] != s.num_rows or int(row_off[-1]) != s.num_rows:
            raise bad(f"top-k arrays have shape {tid.shape}, expected ({s.num_rows}, {m.k})")
        # rows per sample = positions whose next token is trained, within the sample
        m8 = np.asarray(mask).astype(bool)
        nxt = np.zeros_like(m8)
        nxt[:-1] = m8[1:]
        starts = np.asarray(seq_off[1:]) - 1  # last position of each sample has no next token inside it
        nonempty = np.diff(seq_off) > 0
        nxt[starts[nonempty]] = False
        rows_per = np.add.reduceat(nxt.astype(np.int64), np.asarray(seq_off[:-1])[nonempty]) if nonempty.any() else np.zeros(0, np.int64)
        expect = np.zeros(n, np.int64)
        expect[nonempty] = rows_per
        if not np.array_equal(expect, np.diff(row_off)):
            raise bad("number of top-k rows does not match the loss mask")
        if ids.size and int(np.asarray(ids).max()) >= m.tokenizer_length:
            raise bad("token id past the tokenizer length")
        if tid.size:
            if int(np.asarray(tid).max()) >= m.tokenizer_length:
                raise bad("top-k id past the tokenizer length")
            v = _values_fp32(tag_val, val)
            if not np.all(np.isfinite(v)) or np.any(v > 1e-3):
                raise bad("log-probs not finite or above 0")
            if v.shape[1] > 1 and np.any(np.diff(v, axis=1) > 1e-6):
                raise bad("top-k log-probs are not sorted in descending order")
            mass = np.exp(v.astype(np.float64)).sum(axis=1)
            limit = max_topk_mass(m.k, m.value_dtype)
            if np.any(mass > limit):
                raise bad(f"top-k probabilities sum to {mass.max():.4f}, past 1 by more than {m.value_dtype} "
                          f"rounding allows ({limit:.4f} at k={m.k})")
    if m.complete and covered != m.num_samples:
        raise DistillError(f"manifest of {path}: shards cover {covered} of {m.num_samples} samples")
