"""Check a cache end to end: manifest, every shard's checksum, structure and value ranges.

The common tensors (ids, mask, offsets, rows per sample) are checked here; the codec's tensors by the
codec (`Codec.verify`), whose one-line reason names the faulty shard.

`verify_cache` raises DistillError naming the first faulty shard; `distill cache verify` turns that into
exit code 1. Checks are vectorised so that verifying costs about one read of the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from distill.cache.codecs import ID_TAGS, CodecError, codec_for_manifest
from distill.cache.codecs.topk import max_topk_mass  # noqa: F401  (re-exported)
from distill.cache.codecs.values import FP32_SLACK, UNIT_ROUNDOFF  # noqa: F401  (re-exported)
from distill.cache.format import (
    COMMON_TENSORS,
    T_INPUT_IDS,
    T_LOSS_MASK,
    T_ROW_OFFSETS,
    T_SEQ_OFFSETS,
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


def verify_cache(path: str | Path, *, allow_incomplete: bool = False) -> None:
    """Raise DistillError naming the faulty shard (or manifest problem); return None when the cache is sound."""
    path = Path(path)
    m = read_manifest(path)
    if not m.complete and not allow_incomplete:
        raise DistillError(f"cache {path} is incomplete ({m.num_cached_samples}/{m.num_samples} samples); rerun the build to finish it")
    id_tag = ID_TAGS.get(m.id_dtype)
    codec = codec_for_manifest(m)
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
        for t in (*COMMON_TENSORS, *codec.tensor_names):
            if t not in maps:
                raise bad(f"tensor {t!r} missing")
        n = s.end - s.start
        tag_ids, ids = maps[T_INPUT_IDS]
        _, mask = maps[T_LOSS_MASK]
        _, seq_off = maps[T_SEQ_OFFSETS]
        _, row_off = maps[T_ROW_OFFSETS]
        if tag_ids != id_tag:
            raise bad(f"input_ids dtype {tag_ids}, manifest says {id_tag}")
        if seq_off.shape != (n + 1,) or row_off.shape != (n + 1,):
            raise bad(f"offsets do not describe {n} samples")
        if seq_off[0] != 0 or row_off[0] != 0 or np.any(np.diff(seq_off) < 0) or np.any(np.diff(row_off) < 0):
            raise bad("offsets are not increasing from 0")
        if int(seq_off[-1]) != ids.shape[0] or mask.shape != ids.shape or int(seq_off[-1]) != s.num_tokens:
            raise bad("token count does not match offsets/manifest")
        if int(row_off[-1]) != s.num_rows:
            raise bad(f"row offsets end at {int(row_off[-1])}, manifest says {s.num_rows} rows")
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
            raise bad("number of teacher rows does not match the loss mask")
        if ids.size and int(np.asarray(ids).max()) >= m.tokenizer_length:
            raise bad("token id past the tokenizer length")
        try:
            codec.verify(maps, s.num_rows)
        except CodecError as err:
            raise bad(str(err)) from None
        except (ValueError, IndexError, TypeError) as err:  # malformed codec tensors the codec did not foresee
            raise bad(f"{codec.name} tensors are malformed ({err})") from None
    if m.complete and covered != m.num_samples:
        raise DistillError(f"manifest of {path}: shards cover {covered} of {m.num_samples} samples")
