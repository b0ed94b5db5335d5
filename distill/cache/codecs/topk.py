"""Codec "topk": the teacher's k most likely ids and their log-probs, sorted by descending log-prob.

Shard tensors: `topk_ids` [N_rows, k] (id dtype; or `topk_ids_packed`, a uint8 stream of ceil(log2 V)
bits per id, with `pack_ids`) and `topk_logprobs` [N_rows, k] (value dtype: fp16, bf16 or q8). The
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
from distill.cache.codecs import bits as bitpack
from distill.cache.codecs.values import (
    VALUE_DTYPES,
    check_value_dtype,
    load_values,
    max_row_mass,
    store_values,
    value_bits,
    values_fp32,
)
from distill.cache.target import SparseTarget
from distill.errors import DistillError

T_TOPK_IDS = "topk_ids"  # [N_rows, k] ids
T_TOPK_LOGPROBS = "topk_logprobs"  # [N_rows, k] fp16/bf16/q8
PACKED = "_packed"  # suffix of a bit-packed stream (distill/cache/codecs/bits.py)


def max_topk_mass(k: int, value_dtype: str) -> float:
    """How far past 1 the stored top-k probabilities of a row may sum (rounding only); see values.max_row_mass."""
    return max_row_mass(k, value_dtype)


# --top-k when it is not given: 64 teacher tokens per position (~1.5% mean tail mass on SmolLM2).
DEFAULT_TOP_K = 64


class TopKHead:
    """The top-k tensors (ids sorted by descending log-prob, their log-probs) of a shard: encode, open,
    verify. Used by codec topk and as the exact head of codec topk+sampled. With `pack` the ids are a
    bit stream of ceil(log2 V) bits each (`topk_ids_packed`)."""

    def __init__(self, k: int, vocab_size: int, id_dtype: str, value_dtype: str, pack: bool):
        self.k, self.vocab_size, self.id_dtype, self.value_dtype, self.pack = k, vocab_size, id_dtype, value_dtype, pack
        self.id_bits = bitpack.bits_for(vocab_size - 1)

    def names(self) -> tuple[str, ...]:
        return (T_TOPK_IDS + PACKED if self.pack else T_TOPK_IDS, T_TOPK_LOGPROBS)

    def bytes_per_row(self) -> float:
        id_bits = self.id_bits if self.pack else 8 * np.dtype(self.id_dtype).itemsize
        return self.k * (id_bits + value_bits(self.value_dtype)) / 8.0

    def encode(self, ids: torch.Tensor, lp: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        k = self.k
        if ids.shape[0] and (ids.dim() != 2 or ids.shape[1] != k or ids.shape != lp.shape):
            raise ValueError(f"top-k rows of shape {tuple(ids.shape)}/{tuple(lp.shape)}, expected [R, {k}]")
        ids = ids.reshape(-1, k)
        lp = lp.reshape(-1, k).float()
        tail = (1.0 - lp.exp().sum(-1)).sum().item() if lp.numel() else 0.0
        if self.pack:
            stored_ids = torch.from_numpy(bitpack.pack(ids.to(torch.int64).numpy(), self.id_bits))
        else:
            stored_ids = ids.to(torch.int64).to(ID_TORCH[self.id_dtype]).contiguous()
        return {self.names()[0]: stored_ids, T_TOPK_LOGPROBS: store_values(lp, self.value_dtype)}, float(tail)

    def open(self, maps) -> "_TopKShard":
        return _TopKShard(self, maps)

    def verify(self, maps, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Check the head tensors; return (ids [R, k] int64, log-probs fp32 [R, k])."""
        name = self.names()[0]
        tag_tid, tid = maps[name]
        tag_val, val = maps[T_TOPK_LOGPROBS]
        id_tag = "U8" if self.pack else ID_TAGS[self.id_dtype]
        val_tag = VALUE_DTYPES.get(self.value_dtype)
        if tag_tid != id_tag or tag_val != val_tag:
            raise CodecError(f"dtypes {tag_tid}/{tag_val}, manifest says {id_tag}/{val_tag}")
        if self.pack:
            if tid.ndim != 1 or tid.shape[0] != bitpack.packed_nbytes(num_rows * self.k, self.id_bits) or val.shape != (num_rows, self.k):
                raise CodecError(f"top-k stream of {tid.shape[0]} bytes and values of shape {val.shape} do not hold "
                                 f"({num_rows}, {self.k}) entries")
            ids = bitpack.unpack(tid, self.id_bits, 0, num_rows * self.k).reshape(num_rows, self.k)
        else:
            if tid.ndim != 2 or tid.shape != val.shape or tid.shape[1] != self.k or tid.shape[0] != num_rows:
                raise CodecError(f"top-k arrays have shape {tid.shape}, expected ({num_rows}, {self.k})")
            ids = np.asarray(tid, dtype=np.int64)
        if not ids.size:
            return ids, np.zeros((0, self.k), np.float32)
        if int(ids.max()) >= self.vocab_size:
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
        return ids, v


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
        self.params = {"k": int(k), "value_dtype": self.params["value_dtype"], "pack_ids": bool(self.params.get("pack_ids", False))}
        self.head = TopKHead(int(k), self.vocab_size, self.id_dtype, self.params["value_dtype"], self.params["pack_ids"])

    @classmethod
    def params_from_options(cls, *, top_k: int | None = None, value_dtype: str = "fp16", pack_ids: bool = False,
                            samples: int | None = None, proposal_temperature: float = 1.0, **_unused) -> dict[str, Any]:
        if top_k is None:
            top_k = DEFAULT_TOP_K
        if top_k < 1:
            raise DistillError(f"--top-k must be at least 1, got {top_k}")
        if samples is not None or proposal_temperature != 1.0:
            raise DistillError("--codec topk draws no samples; drop --samples / --proposal-temperature (or use --codec topk+sampled)")
        return {"k": int(top_k), "value_dtype": check_value_dtype(value_dtype), "pack_ids": bool(pack_ids)}

    @property
    def k(self) -> int:
        return int(self.params["k"])

    @property
    def width(self) -> int:
        return self.k

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.head.names()

    def bytes_per_row(self) -> float:
        return self.head.bytes_per_row()

    def encode(self, rows: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        return self.head.encode(rows["ids"], rows["logprobs"])

    def open(self, maps) -> CodecShard:
        return self.head.open(maps)

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
        self.head.verify(maps, num_rows)


class _TopKShard(CodecShard):
    def __init__(self, head: TopKHead, maps):
        self.head = head
        self.ids = maps[head.names()[0]][1]
        self.tag, self.vals = maps[T_TOPK_LOGPROBS]
        self.k = head.k

    def decode(self, a: int, b: int, width: int | None = None) -> SparseTarget:
        k = self.k if width is None else int(width)
        if self.head.pack:
            flat = bitpack.unpack(self.ids, self.head.id_bits, a * self.k, (b - a) * self.k)
            ids = torch.from_numpy(flat.reshape(b - a, self.k)[:, :k].copy())
        else:
            ids = torch.from_numpy(np.asarray(self.ids[a:b, :k]).astype(np.int64))
        return SparseTarget(ids, load_values(self.tag, self.vals[a:b, :k]))
