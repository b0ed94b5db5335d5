"""`distill cache merge A B ... --out C`: one cache from caches built separately.

Caches built on other machines or on other slices of the data merge into one when everything that
decides how a stored row is read agrees: the teacher (its weights and settings; not the path it was
loaded from), the tokenizer, the codec and format version, k, the temperature, the stored dtypes, the
logits width and the pad id. Anything else is refused in one line naming the first difference.

C holds A's samples, then B's, and so on: sample indices are renumbered, the shard files are linked
(or copied, across file systems) unchanged under new names, and only their positions in the manifest
are rewritten. The bytes do not change, so every shard's sha256 stays valid and `cache verify` checks C
as it checks any cache. The data fingerprint is recomputed from the shards' ids and masks: it is the
fingerprint a one-go build on the concatenated data records. C is built in a temporary folder and
renamed into place, so a failed merge leaves nothing behind.

With it, a build over several machines needs no shared file system: each machine builds the cache of
its own slice of the data (`--limit`-style slices or separate files), and the caches are merged.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from distill.cache.format import (
    T_INPUT_IDS,
    T_LOSS_MASK,
    T_SEQ_OFFSETS,
    Manifest,
    data_fingerprint,
    mmap_safetensors,
    read_manifest,
    shard_name,
    write_manifest,
)
from distill.errors import DistillError
from distill.io import atomic_directory

# Fields that must be equal for rows of two caches to mean the same thing (the teacher is compared
# without its path; the codec's parameters too: packed ids or another draw count are other bytes).
MERGE_FIELDS = (
    "format_version", "codec", "teacher", "tokenizer_fingerprint", "tokenizer_length", "logits_width", "pad_id",
    "k", "temperature", "value_dtype", "id_dtype", "codec_params",  # the specific fields first: they name the cause
)
# Build figures that add up over the merged caches.
_SUMMED_BUILD = ("truncated_samples", "truncated_tokens", "samples_without_trained_tokens")


def _compared(m: Manifest, name: str):
    value = getattr(m, name)
    if name == "teacher":
        return {k: v for k, v in value.items() if k != "name_or_path"}
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_mergeable(paths: Sequence[Path], manifests: Sequence[Manifest]) -> None:
    """Raise a one-line DistillError unless every cache is complete and agrees with the first one."""
    for path, m in zip(paths, manifests):
        if not m.complete:
            raise DistillError(f"cannot merge: cache {path} is incomplete ({m.num_cached_samples}/{m.num_samples} "
                               "samples); finish its build first")
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:]):
        for name in MERGE_FIELDS:
            a, b = _compared(first, name), _compared(m, name)
            if a != b:
                if name == "teacher":
                    key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                    a, b, name = a.get(key), b.get(key), f"teacher {key}"
                raise DistillError(f"cannot merge {path} with {paths[0]}: different {name.replace('_', ' ')} "
                                   f"({_short(b)} vs {_short(a)}); only caches of one teacher, tokenizer, codec, "
                                   "k, temperature and dtypes merge")


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when both sit on one file system (shards are never modified in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _samples_of(path: Path):
    """(ids, mask) of every sample of one shard, in order (for the data fingerprint)."""
    maps = mmap_safetensors(path)
    ids, mask, offsets = maps[T_INPUT_IDS][1], maps[T_LOSS_MASK][1], maps[T_SEQ_OFFSETS][1]
    for a, b in zip(offsets[:-1], offsets[1:]):
        yield ids[int(a):int(b)], mask[int(a):int(b)]


def merge_caches(inputs: Sequence[str | Path], out: str | Path) -> Manifest:
    """Merge complete caches `inputs` (in that order) into a new cache `out`; return its manifest."""
    paths = [Path(p) for p in inputs]
    out = Path(out)
    if len(paths) < 2:
        raise DistillError("give at least two caches to merge")
    if len({p.resolve() for p in paths}) != len(paths):
        raise DistillError("a cache is given twice; each sample would be in the merged cache twice")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DistillError(f"--out {out} exists and is not empty; give a new directory for the merged cache")
    manifests = [read_manifest(p) for p in paths]
    check_mergeable(paths, manifests)

    first = manifests[0]
    shards, offset = [], 0
    with atomic_directory(out) as tmp:
        for path, m in zip(paths, manifests):
            for s in sorted(m.shards, key=lambda s: s.start):
                index = len(shards)
                name = shard_name(s.rank, index)
                src = path / s.file
                if not src.is_file():
                    raise DistillError(f"cannot merge: cache {path} misses shard {s.file}; run `distill cache verify {path}`")
                _link_or_copy(src, tmp / name)
                shards.append(replace(s, file=name, index=index, start=s.start + offset, end=s.end + offset))
            offset += m.num_samples
        fingerprint = data_fingerprint(
            sample for s in shards for sample in _samples_of(tmp / s.file)
        )
        build = {key: sum(int(m.build.get(key) or 0) for m in manifests) for key in _SUMMED_BUILD}
        build["merged_from"] = [
            {"path": str(p.resolve()), "num_samples": m.num_samples, "data": m.data, "build": m.build}
            for p, m in zip(paths, manifests)
        ]
        merged = replace(
            first,
            num_samples=offset,
            data={"source": "merge of " + ", ".join(str(p) for p in paths), "fingerprint": fingerprint,
                  "max_length": max(int(m.data.get("max_length") or 0) for m in manifests), "shard_size": None},
            build=build,
            shards=shards,
            complete=True,
        )
        write_manifest(tmp, merged)
    return merged
