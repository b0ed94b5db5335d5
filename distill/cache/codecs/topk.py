"""Codec "topk": the teacher's k most likely ids and their log-probs, sorted by descending log-prob.

Shard tensors: `topk_ids` [N_rows, k] (id dtype) and `topk_logprobs` [N_rows, k] (value dtype). The
log-probs are normalised over the full vocabulary at the cache temperature, so the tail mass is
1 - sum exp(topk_logprobs). Decoded targets are exact (weights None): the loss reads them as k tokens
plus one tail bucket. Training temperatures: exact at the cache temperature; another one re-tempers
the k stored tokens exactly and the tail bucket approximately, which the trainer allows only when a
tail rule is named (`--retemper-tail`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from distill.cache.codecs import ID_TAGS, ID_TORCH, Codec, CodecError, CodecShard
from distill.cache.codecs.values import (
    VALUE_DTYPES,
    check_value_dtype,
    load_values,
    max_row_mass,
    store_values,
    values_fp32,
)
from distill.cache.target import SparseTarget
from distill.errors import DistillError

T_TOPK_IDS = "topk_ids"  # [N_rows, k] ids
T_TOPK_LOGPROBS = "topk_logprobs"  # [N_rows, k] fp16/bf16


def max_topk_mass(k: int, value_dtype: str) -> float:
    """How far past 1 the stored top-k probabilities of a row may sum (rounding only); see values.max_row_mass."""
    return max_row_mass(k, value_dtype)


class TopKCodec(Codec):
    name = "topk"
    weighted = False
    needs_full_rows = False
    exact_temperatures = ("the cache temperature; another one re-tempers the k tokens exactly and the tail "
                          "approximately (--retemper-tail)")

    def __init__(self, params: Mapping[str, Any], *, vocab_size: int, id_dtype: str | None = None):
        super().__init__(params, vocab_size=vocab_size, id_dtype=id_dtype)
        k = self.params.get("k")
        if not isinstance(k, int) or k < 1:
            raise DistillError(f"codec topk needs k >= 1 (--top-k), got {k!r}")
        check_value_dtype(self.params.setdefault("value_dtype", "fp16"))
        self.params = {"k": int(k), "value_dtype": self.params["value_dtype"]}

    @classmethod
    def params_from_options(cls, *, top_k: int | None = None, value_dtype: str = "fp16", **_unused) -> dict[str, Any]:
        if top_k is None:
            raise DistillError("--codec topk needs --top-k (the number of teacher tokens stored per position)")
        if top_k < 1:
            raise DistillError(f"--top-k must be at least 1, got {top_k}")
        return {"k": int(top_k), "value_dtype": check_value_dtype(value_dtype)}

    @property
    def k(self) -> int:
        return int(self.params["k"])

    @property
    def width(self) -> int:
        return self.k

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return (T_TOPK_IDS, T_TOPK_LOGPROBS)

    def bytes_per_row(self) -> float:
        return float(self.k * (np.dtype(self.id_dtype).itemsize + 2))

    def encode(self, rows: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        k = self.k
        ids, lp = rows["ids"], rows["logprobs"]
        if ids.shape[0] and (ids.dim() != 2 or ids.shape[1] != k or ids.shape != lp.shape):
            raise ValueError(f"top-k rows of shape {tuple(ids.shape)}/{tuple(lp.shape)}, expected [R, {k}]")
        ids = ids.reshape(-1, k)
        lp = lp.reshape(-1, k).float()
        tail = (1.0 - lp.exp().sum(-1)).sum().item() if lp.numel() else 0.0
        return {
            T_TOPK_IDS: ids.to(torch.int64).to(ID_TORCH[self.id_dtype]).contiguous(),
            T_TOPK_LOGPROBS: store_values(lp, self.value_dtype),
        }, float(tail)

    def open(self, maps) -> CodecShard:
        return _TopKShard(maps, self.k)

    def check_width(self, k: int) -> None:
        if k > self.k or k < 1:
            raise DistillError(f"stores top-{self.k}, but top-{k} was asked for; lower k or rebuild the cache")

    def check_training(self, *, temperature: float, cache_temperature: float, tail_rule: str | None, loss: str) -> None:
        self.check_temperature_rule(temperature=temperature, cache_temperature=cache_temperature, tail_rule=tail_rule, loss=loss)

    @staticmethod
    def check_temperature_rule(*, temperature: float, cache_temperature: float, tail_rule: str | None, loss: str) -> None:
        """Top-k: any loss; the cache temperature, or another one when a tail rule is named."""
        if not math.isclose(float(temperature), float(cache_temperature), rel_tol=1e-9) and tail_rule is None:
            raise DistillError(
                f"--temperature {float(temperature):g} differs from the cache's temperature {float(cache_temperature):g}: "
                f"the teacher's tail can only be re-tempered approximately; rebuild the cache at {float(temperature):g}, "
                "drop --temperature, or accept the approximation with --retemper-tail uniform (recommended) or bucket"
            )

    def verify(self, maps, num_rows: int) -> None:
        tag_tid, tid = maps[T_TOPK_IDS]
        tag_val, val = maps[T_TOPK_LOGPROBS]
        id_tag, val_tag = ID_TAGS[self.id_dtype], VALUE_DTYPES.get(self.value_dtype)
        if tag_tid != id_tag or tag_val != val_tag:
            raise CodecError(f"dtypes {tag_tid}/{tag_val}, manifest says {id_tag}/{val_tag}")
        if tid.ndim != 2 or tid.shape != val.shape or tid.shape[1] != self.k or tid.shape[0] != num_rows:
            raise CodecError(f"top-k arrays have shape {tid.shape}, expected ({num_rows}, {self.k})")
        if not tid.size:
            return
        if int(np.asarray(tid).max()) >= self.vocab_size:
            raise CodecError("top-k id past the tokenizer length")
        v = values_fp32(tag_val, val)
        if not np.all(np.isfinite(v)) or np.any(v > 1e-3):
            raise CodecError("log-probs not finite or above 0")
        if v.shape[1] > 1 and np.any(np.diff(v, axis=1) > 1e-6):
            raise CodecError("top-k log-probs are not sorted in descending order")
        mass = np.exp(v.astype(np.float64)).sum(axis=1)
        limit = max_topk_mass(self.k, self.value_dtype)
        if np.any(mass > limit):
            raise CodecError(f"top-k probabilities sum to {mass.max():.4f}, past 1 by more than {self.value_dtype} "
                             f"rounding allows ({limit:.4f} at k={self.k})")


class _TopKShard(CodecShard):
    def __init__(self, maps, k: int):
        self.ids = maps[T_TOPK_IDS][1]
        self.tag, self.vals = maps[T_TOPK_LOGPROBS]
        self.k = k

    def decode(self, a: int, b: int, width: int | None = None) -> SparseTarget:
        k = self.k if width is None else int(width)
        ids = torch.from_numpy(np.asarray(self.ids[a:b, :k]).astype(np.int64))
        return SparseTarget(ids, load_values(self.tag, self.vals[a:b, :k]))
