"""The settings of a cache build, declared once (`distill cache build` options, the `[cache]` section
of a run config, `teachers.cache_build.build_cache` keywords).

They live apart from `teachers/cache_build.py` only because that module imports torch, and the
command line reads these declarations to build `distill --help`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.data.records import CANONICAL
from distill.models.quant import QUANT_CHOICES
from distill.options import option

VALUE_DTYPE_CHOICES = ("fp16", "bf16", "q8")  # distill.cache.codecs.values (a test keeps them equal; that module imports torch)
# accelerate's big-model placements: spread a teacher too big for one GPU over this machine's GPUs, then the CPU.
DEVICE_MAP_CHOICES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class CacheBuildConfig:
    """Everything `distill cache build` takes; `build_cache` reads the same fields as keywords."""

    teacher: str = option(help="Teacher: model directory, hub id, or a .gguf file.")
    data: str | None = option(help="JSONL/Parquet file, saved datasets dir, or hub data set id.")
    out: Path = option(help="Cache directory (new, empty, or a cache to resume).")
    top_k: int | None = option(None, "Teacher tokens stored per position: codec topk (default 64) and the exact head "
                                     "of topk+sampled.", minimum=1)
    temperature: float = option(1.0, "Log-probs are log_softmax(logits / T).", exclusive_minimum=0)
    max_length: int = option(2048, "Sequences are cut to this many tokens (counted).", minimum=2)
    dtype: str = option("fp16", "Stored log-prob dtype: fp16 (2^-11 relative rounding), bf16 (2^-8, same size) or q8 "
                                "(8 bits, square-root grid, docs/cache-format.md).",
                        choices=VALUE_DTYPE_CHOICES)
    batch_size: int = option(8, "Max sequences per teacher forward.", minimum=1)
    batch_tokens: int | None = option(16384, "Max padded tokens per teacher forward.", minimum=1)
    shard_size: int = option(1024, "Sequences per shard (the unit of resume).", minimum=1)
    fields: dict[str, str] | None = option(None, "Map a column: FIELD=COLUMN (repeatable).", choices=CANONICAL,
                                           flag="--field", metavar="FIELD=COLUMN")
    split: str | None = option(None, "Data set split (default train).")
    data_config: str | None = option(None, "Hub data set config name (e.g. main for gsm8k).")
    limit: int | None = option(None, "Use only the first N records.", minimum=1)
    as_chat: bool = option(False, "Wrap prompt/completion records in the chat template.", flag="--chat")
    trust_remote_code: bool = option(False, "Allow the teacher's own Python code to run.")
    quant: str = option("none", "Load the teacher as none, nf4 or int8.", choices=QUANT_CHOICES, flag="--teacher-quant")
    device: str | None = option(None, "cpu or cuda (default: cuda when available).")
    device_map: str | None = option(None, "auto: spread a teacher too big for one GPU over this machine's GPUs, then the "
                                          "CPU (docs/scale-out.md).", choices=DEVICE_MAP_CHOICES)
    teacher_dtype: str | None = option(None, "bf16, fp16 or fp32 (default bf16 on GPU, fp32 on CPU).")
    revision: str | None = option(None, "Hub revision of the teacher.")
    codec: str = option("topk", "What is stored per position (distill.cache.codecs): topk (the k most likely ids and "
                        "log-probs), sampled (N draws: distinct ids + counts) or topk+sampled (exact top-k + N tail draws).")
    samples: int | None = option(None, "Codecs sampled, topk+sampled: draws per position (1..255).", minimum=1, maximum=255)
    proposal_temperature: float = option(1.0, "Codec sampled: draw from p^(1/T') (T' > 1 flatter) and store importance "
                                              "weights.", exclusive_minimum=0)
    seed: int = option(0, "Sampled codecs: base seed of the per-position draws.")
    pack_ids: bool = option(False, "Bit-pack ids to ceil(log2 V) bits (and draw counts to their width).")
    backend: str = option("hf", "Teacher backend that runs the model (hf: Hugging Face transformers).")
    progress: bool = option(True, "Show a progress bar.")
