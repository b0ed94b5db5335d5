"""Lazy random access to a teacher cache, a torch Dataset over it, and the collate the trainer consumes.

Shards are memory-mapped: opening a cache reads only the manifest and the small offset tensors, and a
sample touches only its own bytes. The rows of trained positions are decoded by the cache's codec
(`distill.cache.codecs`, named in the manifest; an unknown codec is refused in one line) into a
`SparseTarget` (`distill.cache.target`). A sample is a dict:

    index, input_ids [L] int64, loss_mask [L] bool, positions [R] int64 (trained positions, increasing)
    target_ids [R, m] int64, target_logprobs [R, m] fp32   and, when the codec produces them,
    target_weights [R, m] fp32, target_valid [R, m] bool

`collate` produces exactly the "collated cache batch contract":

    input_ids       [B, T] int64  right-padded with pad_id
    attention_mask  [B, T] int64
    targets         [B, T] int64  input_ids[b, t+1] where position t is trained, else -100 (already shifted)
    target_ids      [B, T, m] int64  the decoded sparse target of position t; 0 where not trained
    target_logprobs [B, T, m] fp32   teacher log-probs, normalised over the FULL vocabulary at the cache
                                     temperature; 0.0 where not trained
    target_weights  [B, T, m] fp32   only for estimator codecs (e.g. sampled): the KD term of a position
                                     is sum_j w_j (log p_j - log q_j); 0.0 where not trained or padded.
                                     Absent: exact top-m ids plus a tail bucket (codec topk).
    target_valid    [B, T, m] bool   only for codecs with padded slots: False marks a padded slot

The cache stores rows only for trained positions; collate scatters them back to their positions.
`SparseTarget.from_dict(batch)` gives the loss its target.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distill.cache.codecs import codec_for_manifest
from distill.cache.format import (
    COMMON_TENSORS,
    T_INPUT_IDS,
    T_LOSS_MASK,
    T_ROW_OFFSETS,
    T_SEQ_OFFSETS,
    Manifest,
    mmap_safetensors,
    read_manifest,
)
from distill.cache.target import K_IDS, K_LOGPROBS, K_VALID, K_WEIGHTS, SparseTarget
from distill.errors import DistillError


class CacheReader:
    """Random access by sample index to a complete cache.

    `expect_fingerprint`: the student's tokenizer fingerprint; a different one is refused (ids would mean
    other strings). `expect_k`: the k the caller needs (top-k codec); a cache with fewer entries is
    refused, one with more is cut to the first `expect_k` (rows are sorted, so that is the top-`expect_k`).
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
        self.codec = codec_for_manifest(m)
        self._cut = expect_k is not None and int(expect_k) != self.codec.width
        if self._cut:
            try:
                self.codec.check_width(int(expect_k))
            except DistillError as err:
                raise DistillError(f"cache {self.path} {err}") from None
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
        self._decoders: dict[int, Any] = {}

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
            missing = [t for t in (*COMMON_TENSORS, *self.codec.tensor_names) if t not in maps]
            if missing:
                raise DistillError(f"shard {shard.file} lacks tensors {missing}; run `distill cache verify {self.path}`")
            self._maps[j] = maps
            self._offsets[j] = (np.asarray(maps[T_SEQ_OFFSETS][1]), np.asarray(maps[T_ROW_OFFSETS][1]))
            self._decoders[j] = self.codec.open(maps)
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
        target = self._decoders[j].decode(ra, rb, self.k if self._cut else None)
        positions = torch.nonzero(mask[1:]).flatten()
        if positions.numel() != target.num_rows:
            raise DistillError(f"shard {self._shards[j].file} is inconsistent at sample {g}; run `distill cache verify {self.path}`")
        return {"index": g, "input_ids": ids, "loss_mask": mask, "positions": positions, **target.to_dict()}


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
    first = samples[0][K_IDS]
    m = max(int(s[K_IDS].shape[1]) if s[K_IDS].dim() == 2 else 0 for s in samples) if first.dim() == 2 else 0
    weighted = any(s.get(K_WEIGHTS) is not None for s in samples)
    padded = any(s.get(K_VALID) is not None for s in samples)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.int64)
    attention_mask = torch.zeros((B, T), dtype=torch.int64)
    targets = torch.full((B, T), -100, dtype=torch.int64)
    t_ids = torch.zeros((B, T, m), dtype=torch.int64)
    t_lp = torch.zeros((B, T, m), dtype=torch.float32)
    t_w = torch.zeros((B, T, m), dtype=torch.float32) if weighted else None
    t_valid = torch.zeros((B, T, m), dtype=torch.bool) if padded else None
    for b, s in enumerate(samples):
        ids = s["input_ids"]
        L = int(ids.shape[0])
        input_ids[b, :L] = ids
        attention_mask[b, :L] = 1
        pos = s.get("positions")
        if pos is None:
            pos = torch.nonzero(torch.as_tensor(s["loss_mask"]).bool()[1:]).flatten()
        if pos.numel():
            w = int(s[K_IDS].shape[1])
            targets[b, pos] = ids[pos + 1]
            t_ids[b, pos, :w] = s[K_IDS][:, :m]
            t_lp[b, pos, :w] = s[K_LOGPROBS][:, :m].float()
            if t_w is not None:
                t_w[b, pos, :w] = s[K_WEIGHTS].float()
            if t_valid is not None:
                t_valid[b, pos, :w] = s[K_VALID] if s.get(K_VALID) is not None else True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        **SparseTarget(t_ids, t_lp, t_w, t_valid).to_dict(),
    }
