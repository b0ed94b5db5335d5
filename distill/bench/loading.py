"""Load a model for the benchmark the way a user would deploy it.

Accepted PATHs (resolved by `distill.models.source`):
- a Hugging Face model directory (config.json). A config with a bitsandbytes `quantization_config`
  (an exported 4-bit / 8-bit student) loads quantized as saved;
- a LoRA adapter directory (adapter_config.json, e.g. a training run's `final/`): its base model is
  loaded and the adapters applied. `--quant auto` loads that base in NF4, because that is how the
  QLoRA student was trained and is deployed;
- a `.gguf` file (transformers de-quantizes it; the quantization column says so);
- a hub id (only when the machine has it cached or has network).

`quant` forces a quantization: none | nf4 | int8; `auto` keeps what the model declares. The loading
itself is `distill.models.load_model`; this module only decides what "auto" means here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.models.quant import QUANT_CHOICES as _MODEL_QUANTS

QUANT_CHOICES = ("auto",) + _MODEL_QUANTS
_SOURCE_NAMES = {"dir": "hf-dir", "adapter": "adapter", "gguf": "gguf", "hub": "hub"}


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: str  # what kind of PATH it was: hf-dir | adapter | gguf | hub
    quant_requested: str
    base_path: str | None = None  # for adapters: the base model they sit on


def _config_is_quantized(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("quantization_config"))


def effective_quant(source, quant: str) -> str:
    """What `quant` means for this source: "auto" keeps a model as saved ("none": no extra
    quantization), except an adapter on an unquantized base, which gets the NF4 base it trained on."""
    if quant != "auto":
        return quant
    if source.kind == "adapter" and not (Path(source.base).is_dir() and _config_is_quantized(Path(source.base))):
        return "nf4"
    return "none"


def load_for_bench(name: str, path: str, *, quant: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """(model, tokenizer) in eval mode on the default device; one-line DistillError when it cannot load."""
    from distill.models import load_model, load_tokenizer, resolve_source

    if quant not in QUANT_CHOICES:
        raise DistillError(f"unknown --quant {quant!r}; use one of {', '.join(QUANT_CHOICES)}")
    what = f"model {name}:"
    source = resolve_source(path, what=what, accept=("dir", "adapter", "gguf", "hub"))
    tokenizer = load_tokenizer(source, what=what, trust_remote_code=trust_remote_code)
    model = load_model(source, what=what, quant=effective_quant(source, quant), trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, source=_SOURCE_NAMES[source.kind], quant_requested=quant,
                       base_path=source.base)
