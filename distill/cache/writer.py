"""Streaming, crash-safe cache writer: one shard at a time, each committed atomically, resumable.

Commit order for a shard: write a `*.tmp` file, fsync, rename to its final name, then list it (the main
process rewrites manifest.json atomically; another process rewrites its own progress file). A shard on
disk but listed nowhere (killed between the two renames) is simply rewritten on resume; its content is
deterministic (same samples, same batches, whichever process computes it).

Several processes (`accelerate launch`, see `distill.ranks`) write disjoint shards named after their
rank; only the main process writes the manifest, so it is never rewritten concurrently.

Resuming checks that everything which decides the content (teacher, tokenizer, k, temperature, data,
dtypes) matches the manifest already there; a mismatch is refused in one line, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
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
from distill.io import atomic_write_bytes, holds_only_partial_writes, sweep_partial_writes
from distill.ranks import Ranks

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
    if out.is_dir() and not holds_only_partial_writes(out):  # a build killed while writing its first manifest
        if not (out / MANIFEST_NAME).is_file():
            raise DistillError(
                f"--out {out} is not empty and holds no cache manifest; choose an empty or new directory"
            )
        read_manifest(out)  # raises if it is some other kind of manifest


PROGRESS_RE = re.compile(r"^progress-r(\d{2,})\.json$")


def progress_name(rank: int) -> str:
    """The file in which writer `rank` (not the main one) lists the shards it committed."""
    return f"progress-r{rank:02d}.json"


def _read_progress(path: Path) -> list[ShardInfo]:
    """Shards listed in one progress file; an unreadable one lists nothing (its shards are redone)."""
    try:
        return [ShardInfo(**s) for s in json.loads(path.read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def merge_shard_lists(out: Path, *lists: Sequence[ShardInfo]) -> list[ShardInfo]:
    """One entry per shard index, the first listed winning, kept only while its file is on disk.

    Two entries for one index hold the same samples and the same bytes (content does not depend on
    the writer), so which one stays does not matter; the other file is swept by `finish`.
    """
    seen: dict[int, ShardInfo] = {}
    for shards in lists:
        for s in shards:
            if s.index not in seen and SHARD_RE.match(s.file) and (out / s.file).is_file():
                seen[s.index] = s
    return sorted(seen.values(), key=lambda s: (s.start, s.rank))


class CacheWriter:
    """Writes shards of a cache into `out` from one or several processes; resumes an interrupted build.

    With several processes (`ranks`), each writes only the shards it was given, named after its rank,
    so no two processes ever write one file. The main process (rank 0) alone writes manifest.json: the
    others record what they committed in their own `progress-rRR.json` (rewritten atomically after each
    shard), and the main process folds those files into the manifest whenever it commits a shard of
    its own, and once more in `finish`, after every process is done. Opening the writer folds in what a
    killed build left (manifest plus progress files, whatever its number of processes), so a rerun with
    any number of processes skips every shard that was committed.
    """

    def __init__(self, out: str | Path, manifest: Manifest, *, ranks: Ranks | None = None):
        self.out = Path(out)
        self.ranks = ranks or Ranks()
        self.rank = self.ranks.rank
        self._mine: list[ShardInfo] = []  # shards this (non-main) process committed, its progress file
        manifest.codec_params = codec_for_manifest(manifest).params  # canonical form (defaults filled in)
        self.manifest = manifest
        self.codec = codec_for_manifest(manifest)
        # Only the main process looks at the directory before it is set up (the others could see it
        # half-made); its verdict, or its one-line refusal, reaches every process.
        self.manifest.shards, self.manifest.complete = self.ranks.on_main(self._open)

    def _open(self) -> tuple[list[ShardInfo], bool]:
        """Main process: check what `out` holds, fold a killed build's progress into the manifest, sweep leftovers."""
        check_output_dir(self.out)
        old = read_manifest(self.out) if (self.out / MANIFEST_NAME).is_file() else None
        if old is not None:
            check_same_cache(old, self.manifest, self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        progress = sorted(p for p in self.out.iterdir() if PROGRESS_RE.match(p.name))
        shards = merge_shard_lists(self.out, old.shards if old else [], *(_read_progress(p) for p in progress))
        complete = bool(old is not None and old.complete and {s.file for s in shards} == {s.file for s in old.shards})
        self.manifest.shards, self.manifest.complete = shards, complete
        write_manifest(self.out, self.manifest)
        for p in progress:  # listed in the manifest now
            p.unlink(missing_ok=True)
        sweep_partial_writes(self.out)  # leftovers of a killed write; never part of the cache
        return shards, complete

    def done_indices(self) -> set[int]:
        """Shard indices already committed, by any process of this build or of an earlier one."""
        return {s.index for s in self.manifest.shards}

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
        if self.ranks.is_main:
            m.shards = merge_shard_lists(self.out, [s for s in m.shards if s.index != index] + [info], *self._progress())
            write_manifest(self.out, m)
        else:
            self._mine.append(info)
            atomic_write_bytes(self.out / progress_name(self.rank),
                               (json.dumps({"shards": [asdict(s) for s in self._mine]}, indent=1) + "\n").encode())
        return info

    def _progress(self) -> list[list[ShardInfo]]:
        return [_read_progress(p) for p in sorted(self.out.iterdir()) if PROGRESS_RE.match(p.name)]

    def finish(self, build_info: dict[str, Any] | None = None) -> Manifest:
        """Mark the cache complete once every sample is covered exactly once (after every process is done).

        Collective: every process calls it; the main process merges the progress files into the
        manifest once, checks coverage, writes it and sweeps unlisted shard files; all return it.
        """
        self.ranks.barrier()
        self.manifest = self.ranks.on_main(lambda: self._finish(build_info))
        return self.manifest

    def _finish(self, build_info: dict[str, Any] | None) -> Manifest:
        m = self.manifest
        progress = sorted(p for p in self.out.iterdir() if PROGRESS_RE.match(p.name))
        m.shards = merge_shard_lists(self.out, m.shards, *(_read_progress(p) for p in progress))
        covered = 0
        for s in m.shards:
            if s.start != covered:
                write_manifest(self.out, m)
                raise DistillError(f"cache in {self.out} misses samples {covered}..{s.start}; rerun the build to resume")
            covered = s.end
        if covered != m.num_samples:
            write_manifest(self.out, m)
            raise DistillError(f"cache in {self.out} covers {covered} of {m.num_samples} samples; rerun the build to resume")
        if build_info:
            m.build.update(build_info)
        m.complete = True
        write_manifest(self.out, m)
        for p in progress:
            p.unlink(missing_ok=True)
        # Remove shard files that the manifest does not list (a shard committed twice, by two processes
        # of a killed build, or written by a killed process before its progress file named it).
        listed = {s.file for s in m.shards}
        for p in self.out.iterdir():
            if SHARD_RE.match(p.name) and p.name not in listed:
                os.unlink(p)
        return m


def check_same_cache(old: Manifest, new: Manifest, out: Path) -> None:
    """Refuse to resume into a cache built with something else (one line naming the first difference)."""
    old.codec_params = codec_for_manifest(old).params  # canonical form, as the new manifest's
    for name in IDENTITY_FIELDS:
        a, b = getattr(old, name), getattr(new, name)
        if name == "teacher":  # the same weights moved to another path are the same teacher
            a, b = ({k: v for k, v in d.items() if k != "name_or_path"} for d in (a, b))
        if a != b:
            raise DistillError(
                f"--out {out} holds a cache built with a different {name.replace('_', ' ')}; "
                "use a new --out directory (or delete the old cache)"
            )
