"""The on-disk teacher cache format: manifest, constants, fingerprints and a safetensors mmap reader.

A cache directory holds `manifest.json` plus shards `shard-rRR-NNNNN.safetensors` (RR = writer rank,
NNNNN = shard index). `docs/cache-format.md` is the human description; this module is the machine one.
Everything a reader must agree on (format version, codec, tokenizer fingerprint, k, temperature,
position convention) is in the manifest so that a cache is never silently misread.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.cache.codecs import id_dtype_for  # noqa: F401  (re-exported: the writer's id rule)
from distill.cache.codecs.values import LOGPROB_FLOOR, VALUE_DTYPES  # noqa: F401  (re-exported)
from distill.errors import DistillError
from distill.io import atomic_write_bytes

FORMAT_NAME = "distill-teacher-cache"
# Version 2 adds `codec_params` (the codec's parameters) and per-shard `codec_bytes`; version 1 caches
# (codec "topk", parameters in `k` / `value_dtype`) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# The codec of the per-position distribution (distill/cache/codecs): "topk" = the k most likely ids,
# sorted by descending log-prob, rows stored only for trained positions. Readers refuse a codec they
# do not know instead of misreading it.
CODEC_TOPK = "topk"
POSITION_CONVENTION = (
    "row for position t = teacher distribution of token t+1 given tokens 0..t; rows are stored only "
    "for trained positions t (loss_mask[t+1] == 1), in increasing t"
)
MANIFEST_NAME = "manifest.json"
SHARD_RE = re.compile(r"^shard-r(\d{2,})-(\d{5,})\.safetensors$")

# Tensor names every shard holds, whatever its codec; the codec adds its own (`Codec.tensor_names`).
T_INPUT_IDS = "input_ids"  # [N_tokens] ids, concatenated sequences
T_LOSS_MASK = "loss_mask"  # [N_tokens] uint8, 1 = completion (trained) token
T_SEQ_OFFSETS = "seq_offsets"  # [n+1] int64 token offsets of each sample
T_ROW_OFFSETS = "row_offsets"  # [n+1] int64 row offsets of each sample
COMMON_TENSORS = (T_INPUT_IDS, T_LOSS_MASK, T_SEQ_OFFSETS, T_ROW_OFFSETS)


def known_codecs() -> list[str]:
    from distill.cache.codecs import CODECS

    return list(CODECS)


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:02d}-{index:05d}.safetensors"


@dataclass
class ShardInfo:
    file: str
    rank: int
    index: int
    start: int  # first sample index (global), inclusive
    end: int  # last sample index, exclusive
    num_tokens: int
    num_rows: int
    bytes: int
    sha256: str
    tail_mass_sum: float  # sum over rows of the mass outside the stored exact ids (top-k: 1 - sum p), fp32
    codec_bytes: int = 0  # bytes of the codec's tensors (the rest: the common tensors and the header)


@dataclass
class Manifest:
    """Everything a reader needs to know to use (or refuse) a cache. Serialised as manifest.json."""

    teacher: dict[str, Any]
    tokenizer_fingerprint: str
    tokenizer_length: int
    logits_width: int
    pad_id: int
    k: int  # exact top-k head size of the codec (0 for a codec without one)
    temperature: float
    value_dtype: str  # stored log-prob dtype: "fp16" | "bf16" (| "q8")
    id_dtype: str  # "uint16" | "int32"
    num_samples: int
    data: dict[str, Any]
    build: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    codec: str = CODEC_TOPK
    codec_params: dict[str, Any] = field(default_factory=dict)
    position_convention: str = POSITION_CONVENTION

    def __post_init__(self):
        if not self.codec_params and self.codec == CODEC_TOPK:  # top-k parameters given as the fields
            self.codec_params = {"k": int(self.k), "value_dtype": self.value_dtype}

    # ---- derived figures -------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def num_cached_samples(self) -> int:
        return sum(s.end - s.start for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def codec_bytes(self) -> int:
        return sum(s.codec_bytes for s in self.shards)

    @property
    def mean_tail_mass(self) -> float:
        rows = self.num_rows
        return sum(s.tail_mass_sum for s in self.shards) / rows if rows else 0.0

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise DistillError(f"{where} is not a distill teacher cache manifest (format != {FORMAT_NAME!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or version not in READABLE_VERSIONS:
            raise DistillError(
                f"{where} has cache format version {version}, this distill reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade distill"
            )
        codec = d.get("codec")
        if codec not in known_codecs():
            raise DistillError(f"{where} uses codec {codec!r}, this distill reads only {known_codecs()}: upgrade distill")
        if version == 1:  # version 1: codec topk, its parameters in the top-level fields
            d = dict(d, codec_params={"k": d.get("k"), "value_dtype": d.get("value_dtype", "fp16")})
        try:
            shards = [ShardInfo(**s) for s in d.get("shards", [])]
            fields = {k: v for k, v in d.items() if k != "shards"}
            m = cls(shards=shards, **fields)
        except TypeError as err:
            raise DistillError(f"{where} is malformed ({err}); rebuild the cache") from None
        for s in m.shards:
            if not SHARD_RE.match(s.file):  # never let a manifest point outside its directory
                raise DistillError(f"{where} names an invalid shard file {s.file!r}; rebuild the cache")
        return m


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DistillError(f"{directory} is not a teacher cache (no {MANIFEST_NAME}); build one with `distill cache build`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DistillError(f"{path} cannot be read as JSON ({err}); rebuild the cache") from None
    return Manifest.from_dict(data, where=str(path))


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    atomic_write_bytes(Path(directory) / MANIFEST_NAME, manifest.to_json().encode())


def data_fingerprint(samples) -> str:
    """sha256 over every sample's token ids and loss mask, in order (`samples`: (ids, mask) pairs).

    Recorded in the manifest: resuming a build on other data is refused, and a merged cache gets the
    fingerprint of the concatenated data, as if it had been built in one go."""
    h = hashlib.sha256()
    for ids, mask in samples:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(mask, dtype=np.uint8).tobytes())
        h.update(b"#")
    return "sha256:" + h.hexdigest()


# ---- tokenizer fingerprint -------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides token ids: vocabulary, merges, normalisation, special tokens, chat template.

    Sizes alone are not enough (two tokenizers with 49,152 entries can map text differently). Runtime
    state that does not change ids (truncation/padding settings) is left out, so the fingerprint is
    stable across calls.
    """
    parts: dict[str, Any] = {"length": len(tokenizer)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        parts["backend"] = spec
    else:
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    parts["special"] = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    parts["added"] = sorted((str(k), int(v)) for k, v in tokenizer.get_added_vocab().items())
    parts["chat_template"] = getattr(tokenizer, "chat_template", None)
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# ---- minimal memory-mapped safetensors reader ------------------------------------------------

_ST_DTYPES = {
    "U8": np.uint8, "U16": np.uint16, "I32": np.int32, "I64": np.int64,
    "F16": np.float16, "BF16": np.uint16, "F32": np.float32,
}


def mmap_safetensors(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """Map every tensor of a safetensors file without reading it: name -> (dtype tag, numpy view).

    BF16 comes back as uint16 (numpy has no bfloat16); torch reinterprets it with `.view`. Raises
    DistillError naming the file when its header or sizes are inconsistent (e.g. a truncated shard).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8 or hlen > 100_000_000:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(hlen))
    except (ValueError, OSError) as err:
        raise DistillError(f"shard {path.name} is corrupt ({err}); run `distill cache verify` and rebuild it") from None
    base = 8 + hlen
    out: dict[str, tuple[str, np.ndarray]] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            tag = info["dtype"]
            np_dtype = np.dtype(_ST_DTYPES[tag])
            shape = tuple(int(x) for x in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DistillError(f"shard {path.name} has an unreadable tensor entry {name!r}; rebuild it") from None
        count = int(np.prod(shape)) if shape else 1
        if b - a != count * np_dtype.itemsize or base + b > size or a < 0:
            raise DistillError(f"shard {path.name} is truncated or corrupt (tensor {name!r} past the end of the file); rebuild it")
        out[name] = (tag, mm[base + a: base + b].view(np_dtype).reshape(shape))
    return out
