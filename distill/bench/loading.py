"""Load a model for the benchmark the way a user would deploy it.

Accepted PATHs:
- a Hugging Face model directory (config.json). A config with a bitsandbytes `quantization_config`
  (an exported 4-bit / 8-bit student) loads quantized as saved;
- a LoRA adapter directory (adapter_config.json, e.g. a training run's `final/`): its base model is
  loaded and the adapters applied. `--quant auto` loads that base in NF4, because that is how the
  QLoRA student was trained and is deployed;
- a `.gguf` file (transformers de-quantizes it; the quantization column says so);
- a hub id (only when the machine has it cached or has network).

`quant` forces a quantization: none | nf4 | int8; `auto` keeps what the model declares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError

QUANT_CHOICES = ("auto", "none", "nf4", "int8")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: str  # what kind of PATH it was: hf-dir | adapter | gguf | hub
    quant_requested: str
    base_path: str | None = None  # for adapters: the base model they sit on


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return (msg[:240] + "...") if len(msg) > 240 else (msg or type(err).__name__)


def _device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _dtype(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _bnb_config(quant: str, dtype):
    if quant in ("auto", "none"):
        return None
    from students.model import quantization_config

    return quantization_config(quant, dtype)


def _config_is_quantized(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("quantization_config"))


def load_for_bench(name: str, path: str, *, quant: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """(model, tokenizer) in eval mode on the default device; one-line DistillError when it cannot load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quant not in QUANT_CHOICES:
        raise DistillError(f"unknown --quant {quant!r}; use one of {', '.join(QUANT_CHOICES)}")
    device = _device()
    dtype = _dtype(device)
    p = Path(path)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    tok_source = None
    base_path = None
    if p.is_file() and p.suffix == ".gguf":
        source, model_source, tok_source = "gguf", str(p.parent), str(p.parent)
        kwargs["gguf_file"] = p.name
    elif p.is_dir() and (p / "adapter_config.json").exists():
        source = "adapter"
        try:
            base_path = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError):
            raise DistillError(f"model {name}: {p}/adapter_config.json names no base_model_name_or_path") from None
        model_source = base_path
        tok_source = str(p) if (p / "tokenizer_config.json").exists() else base_path
        if quant == "auto" and not (Path(base_path).is_dir() and _config_is_quantized(Path(base_path))):
            quant_eff = "nf4"
        else:
            quant_eff = quant
    elif p.is_dir():
        if not (p / "config.json").exists():
            raise DistillError(f"model {name}: {p} has no config.json (nor adapter_config.json); pass a model directory, an adapter directory or a .gguf file")
        source, model_source, tok_source = "hf-dir", str(p), str(p)
    elif p.exists():
        raise DistillError(f"model {name}: {p} is a file but not a .gguf; pass a model directory or a .gguf file")
    else:
        looks_like_hub = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if not looks_like_hub:
            raise DistillError(f"model {name}: {path} does not exist; pass a model directory, an adapter directory, a .gguf file or a hub id org/name")
        source, model_source, tok_source = "hub", path, path
    if source != "adapter":
        quant_eff = quant
    if source == "gguf" and quant_eff == "auto":
        quant_eff = "none"

    qcfg = _bnb_config(quant_eff, dtype)
    load_kwargs = dict(kwargs)
    load_kwargs["dtype"] = dtype
    if qcfg is not None:
        load_kwargs["quantization_config"] = qcfg
        load_kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(model_source, **load_kwargs)
        if qcfg is None and not getattr(model, "is_quantized", False):
            model.to(device)
        if source == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(p), is_trainable=False)
    except DistillError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        raise DistillError(f"model {name} ({path}) does not load: {_one_line(err)}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, quant_requested=quant, base_path=base_path)
