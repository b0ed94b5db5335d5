"""Cache codecs: how the teacher's distribution at a trained position is stored in a shard.

The common shard tensors (input_ids, loss_mask, seq_offsets, row_offsets) belong to the cache format
(`distill/cache/format.py`); everything that describes the rows of trained positions belongs to the
codec named in the manifest (`codec`, with its parameters in `codec_params`). A codec has four jobs:

    encode(rows)            the teacher rows of a shard -> named tensors for the shard (+ tail mass sum)
    open(maps).decode(a,b)  rows a..b of a shard -> a `SparseTarget` (distill/cache/target.py)
    verify(maps, n, vocab)  a shard's codec tensors -> None, or CodecError with a one-line reason
    bytes_per_row()         the nominal size of one row (None when it varies, e.g. sampled ids)

and two it answers for the runner and the trainer: `reduce(x, seeds)` turns a chunk of the teacher's
scaled logits into teacher rows (codecs that need the full row, `needs_full_rows`), and
`check_training(...)` refuses a training temperature or loss the codec cannot serve exactly.

`CODECS` is the registry; `get_codec(name, params, vocab_size=)` refuses an unknown name in one line
listing the known ones, and `codec_for_manifest(manifest)` is what readers use. Codecs hold no state
between calls beyond their parameters (random draws are seeded per row), so any number of processes
encode and decode the same bytes.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from distill.cache.target import SparseTarget
from distill.errors import DistillError


class CodecError(ValueError):
    """A shard's codec tensors are inconsistent; the message is one line naming what is wrong."""


def id_dtype_for(vocab_size: int) -> str:
    """Smallest integer type that holds every token id: uint16 up to 65,536 ids, else int32."""
    return "uint16" if vocab_size <= 65536 else "int32"


ID_TAGS = {"uint16": "U16", "int32": "I32"}
ID_TORCH = {"uint16": torch.uint16, "int32": torch.int32}


class Codec:
    """Base class of a codec; a subclass sets the class attributes and implements the methods.

    name: the manifest's `codec`. weighted: decoded targets carry weights (an estimator, see
    SparseTarget). needs_full_rows: encoding needs the teacher's full next-token distribution (the
    runner then asks the backend for rows of logits, not its top-k). exact_temperatures: the sentence
    that `distill cache info` and the docs show about training temperatures.
    """

    name: ClassVar[str] = ""
    weighted: ClassVar[bool] = False
    needs_full_rows: ClassVar[bool] = False
    exact_temperatures: ClassVar[str] = ""

    def __init__(self, params: Mapping[str, Any], *, vocab_size: int, id_dtype: str | None = None):
        self.vocab_size = int(vocab_size)
        self.id_dtype = id_dtype or id_dtype_for(self.vocab_size)
        if self.id_dtype not in ID_TAGS:
            raise DistillError(f"id dtype {self.id_dtype!r} is unknown; rebuild the cache")
        self.params: dict[str, Any] = dict(params)

    # ---- what the manifest records ---------------------------------------------------------------
    @property
    def k(self) -> int:
        """Exact top-k head size (the manifest's `k`); 0 for a codec without one."""
        return 0

    @property
    def value_dtype(self) -> str:
        return str(self.params.get("value_dtype", "fp16"))

    @property
    def seed(self) -> int:
        """Base seed of the per-row draws (codecs that sample)."""
        return int(self.params.get("seed", 0))

    @property
    def width(self) -> int:
        """m: slots per decoded row."""
        raise NotImplementedError

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Names of the shard tensors this codec writes (checked present by readers and verify)."""
        raise NotImplementedError

    # ---- encode / decode / verify -----------------------------------------------------------------
    def reduce(self, x: torch.Tensor, seeds: np.ndarray | None) -> dict[str, torch.Tensor]:
        """Teacher rows from a chunk of scaled fp32 logits x [C, V] (logits[:, :vocab] / T)."""
        raise NotImplementedError(f"codec {self.name} encodes from the teacher's top-k, not from full rows")

    def encode(self, rows: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """The shard tensors for these teacher rows (all samples of a shard, in order) and the sum over
        rows of the teacher's tail mass outside the stored exact ids (0 for codecs without such a head)."""
        raise NotImplementedError

    def empty_rows(self) -> dict[str, torch.Tensor]:
        """Teacher rows for a shard without trained positions."""
        return {"ids": torch.zeros((0, self.width), dtype=torch.int64), "logprobs": torch.zeros((0, self.width))}

    def open(self, maps: Mapping[str, tuple[str, np.ndarray]]) -> "CodecShard":
        raise NotImplementedError

    def verify(self, maps: Mapping[str, tuple[str, np.ndarray]], num_rows: int) -> None:
        raise NotImplementedError

    def bytes_per_row(self) -> float | None:
        return None

    def check_width(self, k: int) -> None:
        """Refuse (DistillError, a phrase that follows "cache PATH") decoding only the first k slots of
        each row; only an exact sorted head can be cut (`open(maps).decode(a, b, width=k)`)."""
        raise DistillError(f"uses codec {self.name}, whose rows cannot be cut to {k} entries; use them whole")

    # ---- what training may do with it ----------------------------------------------------------
    def check_training(self, *, temperature: float, cache_temperature: float, tail_rule: str | None, loss: str) -> None:
        """Raise DistillError (one line) for a training temperature or loss this codec cannot serve."""
        if not math.isclose(float(temperature), float(cache_temperature), rel_tol=1e-9):
            raise DistillError(
                f"this cache's codec ({self.name}) stores an estimate of the teacher at its temperature "
                f"{cache_temperature:g} that cannot be re-tempered exactly; train at {cache_temperature:g} "
                "(drop --temperature) or rebuild the cache at the temperature you want"
            )
        if self.weighted and loss != "forward-kl":
            raise DistillError(
                f"--loss {loss} needs the teacher's probability of every token, which a {self.name} cache "
                "does not hold; use --loss forward-kl with this cache"
            )


class CodecShard:
    """A codec's view of one opened shard: `decode(a, b, width=None)` -> SparseTarget of rows a..b."""

    def decode(self, a: int, b: int, width: int | None = None) -> SparseTarget:
        raise NotImplementedError


def _registry() -> dict[str, type[Codec]]:
    from distill.cache.codecs.sampled import SampledCodec, TopKSampledCodec
    from distill.cache.codecs.topk import TopKCodec

    return {TopKCodec.name: TopKCodec, SampledCodec.name: SampledCodec, TopKSampledCodec.name: TopKSampledCodec}


CODECS: dict[str, type[Codec]] = _registry()
DEFAULT_CODEC = "topk"


def check_codec_name(name: str, *, flag: str = "--codec") -> str:
    if name not in CODECS:
        raise DistillError(f"unknown {flag} {name!r}; known codecs: {', '.join(CODECS)}")
    return name


def get_codec(name: str, params: Mapping[str, Any] | None = None, *, vocab_size: int,
              id_dtype: str | None = None) -> Codec:
    """The codec `name` with its parameters (as recorded in a manifest); an unknown name is one line."""
    return CODECS[check_codec_name(name)](dict(params or {}), vocab_size=vocab_size, id_dtype=id_dtype)


def codec_for_manifest(manifest) -> Codec:
    """The codec a cache was written with, from its manifest (readers, verify, the trainer)."""
    if manifest.codec not in CODECS:
        raise DistillError(
            f"cache uses codec {manifest.codec!r}, this distill reads only {list(CODECS)}: upgrade distill"
        )
    return get_codec(manifest.codec, manifest.codec_params, vocab_size=manifest.tokenizer_length,
                     id_dtype=manifest.id_dtype)


def codec_from_options(name: str, **options) -> dict[str, Any]:
    """Codec parameters from the build options (`distill cache build`), checked by the codec."""
    return CODECS[check_codec_name(name)].params_from_options(**options)
