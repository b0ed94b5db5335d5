"""Streaming, crash-safe cache writer: one shard at a time, each committed atomically, resumable.

Commit order for a shard: write a `*.tmp` file, fsync, rename to its final name, then rewrite the manifest
atomically with the shard listed. A shard that is on disk but not in the manifest (killed between the
two renames) is simply rewritten on resume; its content is deterministic (same samples, same batches).

Resuming checks that everything which decides the content (teacher, tokenizer, k, temperature, data,
dtypes) matches the manifest already there; a mismatch is refused in one line, never mixed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save as st_save

from distill.cache.codecs import ID_TORCH, codec_for_manifest
from distill.cache.format import (
    MANIFEST_NAME,
    SHARD_RE,
    T_INPUT_IDS,
    T_LOSS_MASK,
    T_ROW_OFFSETS,
    T_SEQ_OFFSETS,
    Manifest,
    ShardInfo,
    read_manifest,
    shard_name,
    write_manifest,
)
from distill.errors import DistillError
from distill.io import atomic_write_bytes

# Manifest fields that decide the content of a cache: resuming requires all of them to be equal.
IDENTITY_FIELDS = (
    "teacher", "tokenizer_fingerprint", "tokenizer_length", "logits_width", "pad_id", "k", "temperature",
    "value_dtype", "id_dtype", "num_samples", "data", "format_version", "codec", "codec_params",
)


@dataclass
class CachedSample:
    """One sequence ready to be written: ids, mask, and the teacher rows of its trained positions.

    The rows are what the codec encodes: `ids` and `logprobs` [R, ...] (top-k: the k most likely ids
    and their fp32 log-probs, rounded on write), plus whatever else the codec's `reduce` produced
    (`extra`, e.g. draw counts), every tensor with one row per trained position.
    """

    input_ids: np.ndarray  # [L] int
    loss_mask: np.ndarray  # [L] uint8/bool
    ids: torch.Tensor  # [R, ...] int
    logprobs: torch.Tensor  # [R, ...] float32
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "logprobs": self.logprobs, **self.extra}


def trained_positions(loss_mask: np.ndarray) -> np.ndarray:
    """Positions t whose next token t+1 is a completion token: the rows a cache stores for a sample."""
    m = np.asarray(loss_mask).astype(bool)
    return np.nonzero(m[1:])[0]


def check_output_dir(out: str | Path) -> None:
    """Refuse an output directory that holds something other than a teacher cache (fast, before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} is a file; give a directory for the cache")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_NAME).is_file():
            raise DistillError(
                f"--out {out} is not empty and holds no cache manifest; choose an empty or new directory"
            )
        read_manifest(out)  # raises if it is some other kind of manifest


class CacheWriter:
    """Writes shards of a cache into `out` for writer `rank`; resumes an interrupted build of the same cache."""

    def __init__(self, out: str | Path, manifest: Manifest, *, rank: int = 0):
        self.out = Path(out)
        self.rank = rank
        check_output_dir(self.out)
        manifest.codec_params = codec_for_manifest(manifest).params  # canonical form (defaults filled in)
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / MANIFEST_NAME).is_file():
            old = read_manifest(self.out)
            old.codec_params = codec_for_manifest(old).params
            for name in IDENTITY_FIELDS:
                a, b = getattr(old, name), getattr(manifest, name)
                if name == "teacher":  # the same weights moved to another path are the same teacher
                    a, b = ({k: v for k, v in d.items() if k != "name_or_path"} for d in (a, b))
                if a != b:
                    raise DistillError(
                        f"--out {self.out} holds a cache built with a different {name.replace('_', ' ')}; "
                        "use a new --out directory (or delete the old cache)"
                    )
            manifest.shards = [s for s in old.shards if (self.out / s.file).is_file()]
            manifest.complete = old.complete and len(manifest.shards) == len(old.shards)
        self.manifest = manifest
        self.codec = codec_for_manifest(manifest)
        for stale in self.out.glob("*.tmp"):  # leftovers of a killed write; never part of the cache
            stale.unlink(missing_ok=True)
        write_manifest(self.out, self.manifest)

    def done_indices(self) -> set[int]:
        return {s.index for s in self.manifest.shards if s.rank == self.rank}

    def write_shard(self, index: int, start: int, samples: Sequence[CachedSample]) -> ShardInfo:
        m = self.manifest
        id_t = ID_TORCH[m.id_dtype]
        lens = [len(s.input_ids) for s in samples]
        rows = [int(s.ids.shape[0]) for s in samples]
        for s, r in zip(samples, rows):
            expect = len(trained_positions(s.loss_mask))
            bad = [name for name, t in s.rows().items() if int(t.shape[0]) != expect]
            if bad:
                raise ValueError(f"sample has {r} teacher rows ({', '.join(bad)}), expected {expect}")
        ids = np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in samples]) if samples else np.zeros(0, np.int64)
        mask = np.concatenate([np.asarray(s.loss_mask, dtype=np.uint8) for s in samples]) if samples else np.zeros(0, np.uint8)
        keys = list(samples[0].rows()) if samples else []
        joined = {key: torch.cat([s.rows()[key] for s in samples]) for key in keys}
        codec_tensors, tail = self.codec.encode(joined if samples else self.codec.empty_rows())
        tensors = {
            T_INPUT_IDS: torch.from_numpy(ids).to(id_t),
            T_LOSS_MASK: torch.from_numpy(mask),
            T_SEQ_OFFSETS: torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int64),
            T_ROW_OFFSETS: torch.tensor(np.concatenate([[0], np.cumsum(rows)]), dtype=torch.int64),
            **codec_tensors,
        }
        blob = st_save(tensors)  # no metadata: its key order is random per process, and bytes must be reproducible
        name = shard_name(self.rank, index)
        atomic_write_bytes(self.out / name, blob)
        info = ShardInfo(
            file=name, rank=self.rank, index=index, start=start, end=start + len(samples),
            num_tokens=int(sum(lens)), num_rows=int(sum(rows)), bytes=len(blob),
            sha256=hashlib.sha256(blob).hexdigest(), tail_mass_sum=float(tail),
            codec_bytes=int(sum(t.numel() * t.element_size() for t in codec_tensors.values())),
        )
        m.shards = [s for s in m.shards if not (s.rank == self.rank and s.index == index)] + [info]
        m.shards.sort(key=lambda s: (s.start, s.rank))
        write_manifest(self.out, m)
        return info

    def finish(self, build_info: dict[str, Any] | None = None) -> Manifest:
        """Mark the cache complete once every sample is covered exactly once by a shard."""
        m = self.manifest
        covered = 0
        for s in sorted(m.shards, key=lambda s: s.start):
            if s.start != covered:
                raise DistillError(f"cache in {self.out} misses samples {covered}..{s.start}; rerun the build to resume")
            covered = s.end
        if covered != m.num_samples:
            raise DistillError(f"cache in {self.out} covers {covered} of {m.num_samples} samples; rerun the build to resume")
        if build_info:
            m.build.update(build_info)
        m.complete = True
        write_manifest(self.out, m)
        # Remove shard files of this rank that the manifest does not list (e.g. a different shard size).
        listed = {s.file for s in m.shards}
        for p in self.out.iterdir():
            if SHARD_RE.match(p.name) and p.name not in listed:
                os.unlink(p)
        return m
