"""Lazy random access to a teacher cache, a torch Dataset over it, and the collate the trainer consumes.

Shards are memory-mapped: opening a cache reads only the manifest and the small offset tensors, and a
sample touches only its own bytes. `collate` produces exactly the "collated cache batch contract":

    input_ids      [B, T] int64  right-padded with pad_id
    attention_mask [B, T] int64
    targets        [B, T] int64  input_ids[b, t+1] where position t is trained, else -100 (already shifted)
    topk_ids       [B, T, k] int64   teacher's top-k ids for position t; 0 where not trained
    topk_logprobs  [B, T, k] fp32    full-vocabulary log-probs at the cache temperature; 0.0 where not trained

The cache stores rows only for trained positions; collate scatters them back to their positions.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distill.cache.format import (
    SHARD_TENSORS,
    T_INPUT_IDS,
    T_LOSS_MASK,
    T_ROW_OFFSETS,
    T_SEQ_OFFSETS,
    T_TOPK_IDS,
    T_TOPK_LOGPROBS,
    Manifest,
    mmap_safetensors,
    read_manifest,
)
from distill.errors import DistillError


class CacheReader:
    """Random access by sample index to a complete cache.

    `expect_fingerprint`: the student's tokenizer fingerprint; a different one is refused (ids would mean
    other strings). `expect_k`: the k the caller needs; a cache with fewer entries is refused, one with
    more is cut to the first `expect_k` (rows are sorted, so that is the top-`expect_k`).
    `expect_temperature`: refuse a cache stored at another temperature. `allow_incomplete`: read the
    finished shards of a build still in progress (default: refuse).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        expect_fingerprint: str | None = None,
        expect_k: int | None = None,
        expect_temperature: float | None = None,
        allow_incomplete: bool = False,
    ):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        m = self.manifest
        if not m.complete and not allow_incomplete:
            raise DistillError(
                f"cache {self.path} is incomplete ({m.num_cached_samples}/{m.num_samples} samples); "
                "rerun the same `distill cache build` command to finish it"
            )
        if expect_fingerprint is not None and expect_fingerprint != m.tokenizer_fingerprint:
            raise DistillError(
                f"cache {self.path} was built with another tokenizer ({m.tokenizer_fingerprint[:19]}..., "
                f"student has {expect_fingerprint[:19]}...); rebuild the cache with a teacher that shares the student's tokenizer"
            )
        if expect_k is not None and expect_k > m.k:
            raise DistillError(f"cache {self.path} stores top-{m.k}, but top-{expect_k} was asked for; lower k or rebuild the cache")
        if expect_temperature is not None and abs(float(expect_temperature) - float(m.temperature)) > 1e-9:
            raise DistillError(
                f"cache {self.path} was stored at temperature {m.temperature}, not {expect_temperature}; rebuild it or use its temperature"
            )
        self.k = int(expect_k) if expect_k is not None else int(m.k)
        self._shards = sorted(m.shards, key=lambda s: s.start)
        self._starts = [s.start for s in self._shards]
        self._index: list[int] = []  # global sample indices available, sorted
        for s in self._shards:
            self._index.extend(range(s.start, s.end))
        self._dense = self._index == list(range(len(self._index)))
        self._maps: dict[int, dict[str, tuple[str, np.ndarray]]] = {}
        self._offsets: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, j: int):
        maps = self._maps.get(j)
        if maps is None:
            shard = self._shards[j]
            file = self.path / shard.file
            if not file.is_file():
                raise DistillError(f"cache {self.path} misses shard {shard.file}; rebuild the cache")
            maps = mmap_safetensors(file)
            missing = [t for t in SHARD_TENSORS if t not in maps]
            if missing:
                raise DistillError(f"shard {shard.file} lacks tensors {missing}; run `distill cache verify {self.path}`")
            self._maps[j] = maps
            self._offsets[j] = (np.asarray(maps[T_SEQ_OFFSETS][1]), np.asarray(maps[T_ROW_OFFSETS][1]))
        return maps, self._offsets[j]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        g = i if self._dense else self._index[i]
        j = bisect.bisect_right(self._starts, g) - 1
        local = g - self._shards[j].start
        maps, (seq_off, row_off) = self._shard(j)
        a, b = int(seq_off[local]), int(seq_off[local + 1])
        ra, rb = int(row_off[local]), int(row_off[local + 1])
        ids = torch.from_numpy(np.asarray(maps[T_INPUT_IDS][1][a:b]).astype(np.int64))
        mask = torch.from_numpy(np.asarray(maps[T_LOSS_MASK][1][a:b]).astype(bool))
        k = self.k
        tids = torch.from_numpy(np.asarray(maps[T_TOPK_IDS][1][ra:rb, :k]).astype(np.int64))
        tag, arr = maps[T_TOPK_LOGPROBS]
        raw = np.array(arr[ra:rb, :k], copy=True)
        if tag == "BF16":
            vals = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
        else:
            vals = torch.from_numpy(raw.astype(np.float32))
        positions = torch.nonzero(mask[1:]).flatten()
        if positions.numel() != tids.shape[0]:
            raise DistillError(f"shard {self._shards[j].file} is inconsistent at sample {g}; run `distill cache verify {self.path}`")
        return {"index": g, "input_ids": ids, "loss_mask": mask, "positions": positions, "topk_ids": tids, "topk_logprobs": vals}


class CacheDataset(torch.utils.data.Dataset):
    """A torch Dataset over a reader, optionally restricted to `indices` (e.g. a held-out split)."""

    def __init__(self, reader: CacheReader, indices: Sequence[int] | None = None):
        self.reader = reader
        self.indices = list(range(len(reader))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.reader[self.indices[i]]


def split_indices(n: int, eval_fraction: float, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) split of range(n); at least one held-out sample when n > 1."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DistillError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n > 1:
        n_eval = max(1, n_eval)
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def collate(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad samples to one batch following the collated cache batch contract (see module docstring)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    B = len(samples)
    T = max(int(s["input_ids"].shape[0]) for s in samples)
    k = int(samples[0]["topk_ids"].shape[1]) if samples[0]["topk_ids"].dim() == 2 else 0
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.int64)
    attention_mask = torch.zeros((B, T), dtype=torch.int64)
    targets = torch.full((B, T), -100, dtype=torch.int64)
    topk_ids = torch.zeros((B, T, k), dtype=torch.int64)
    topk_logprobs = torch.zeros((B, T, k), dtype=torch.float32)
    for b, s in enumerate(samples):
        ids = s["input_ids"]
        L = int(ids.shape[0])
        input_ids[b, :L] = ids
        attention_mask[b, :L] = 1
        pos = s.get("positions")
        if pos is None:
            pos = torch.nonzero(torch.as_tensor(s["loss_mask"]).bool()[1:]).flatten()
        if pos.numel():
            targets[b, pos] = ids[pos + 1]
            topk_ids[b, pos] = s["topk_ids"][:, :k]
            topk_logprobs[b, pos] = s["topk_logprobs"][:, :k].float()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
    }
