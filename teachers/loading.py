"""Load a teacher (model + tokenizer) from a local directory or a hub id.

Defaults are the safe ones: `trust_remote_code=False` unless the user asks, bf16 weights on GPU and fp32
on CPU (CPU bf16 matmuls are slow and lossy), optional 4-bit NF4 / 8-bit loading through bitsandbytes
for teachers larger than the GPU. Whatever goes wrong becomes a one-line DistillError.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError

QUANT_CHOICES = ("none", "nf4", "int8")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# A hub id is `name` or `org/name`; anything else with a separator can only be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_path(name_or_path: str) -> bool:
    if name_or_path.startswith((".", "/", "~")):
        return True
    seps = [s for s in (os.sep, os.altsep) if s]
    return any(s in name_or_path for s in seps) and not _HUB_ID.match(name_or_path)


def _resolve(name_or_path: str) -> str:
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DistillError(f"teacher {name_or_path} is a file; give a model directory (for a .gguf file run `distill teacher import-gguf` first)")
        if not (p / "config.json").is_file():
            raise DistillError(f"teacher directory {p} has no config.json; give a Hugging Face model directory")
        return str(p.resolve())
    if _looks_like_path(name_or_path):
        # Fail now: handed to the hub client, a missing path is retried for ~30 s when offline.
        raise DistillError(f"teacher directory {name_or_path} does not exist; give a model directory or a hub id (org/name)")
    return name_or_path


def load_teacher_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    src = _resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:
        raise DistillError(f"cannot load the tokenizer of teacher {name_or_path!r} ({_first_line(err)})") from None
    if tok.pad_token_id is None:
        # Padding is only ever masked out; EOS is the conventional stand-in when a tokenizer has no pad.
        if tok.eos_token is None:
            raise DistillError(f"teacher tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_teacher(
    name_or_path: str,
    *,
    device: str | None = None,
    quant: str = "none",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    load_tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Return (model in eval mode, tokenizer or None). `dtype`: 'bf16'|'fp16'|'fp32' (default by device)."""
    from transformers import AutoModelForCausalLM

    if quant not in QUANT_CHOICES:
        raise DistillError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"device {device!r} asked for but no CUDA GPU is available; use --device cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise DistillError(f"teacher dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    src = _resolve(name_or_path)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision)
    if quant != "none":
        from transformers import BitsAndBytesConfig

        if quant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except Exception as err:
        raise DistillError(f"cannot load teacher {name_or_path!r} ({_first_line(err)})") from None
    if quant == "none":
        model.to(device)
    model.eval()
    tok = load_teacher_tokenizer(name_or_path, trust_remote_code=trust_remote_code, revision=revision) if load_tokenizer else None
    return model, tok


def config_hash(config) -> str:
    """sha256 of the model config minus fields that do not change the function (paths, versions)."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        d.pop(key, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@torch.no_grad()
def weights_probe(model, per_tensor: int = 64) -> str:
    """A cheap fingerprint of the weights: hash of the first values of every parameter and buffer.

    Two teachers with one config (e.g. two seeds, or base vs fine-tune) differ here, so resuming a cache
    with another teacher is caught without hashing gigabytes.
    """
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        flat = t.detach().reshape(-1)[:per_tensor]
        if flat.is_floating_point():
            flat = flat.float()
        h.update(name.encode())
        h.update(flat.cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def teacher_identity(model, name_or_path: str, *, quant: str = "none", revision: str | None = None) -> dict[str, Any]:
    cfg = model.config
    return {
        "name_or_path": _resolve(name_or_path),
        "revision": revision or getattr(cfg, "_commit_hash", None),
        "model_type": getattr(cfg, "model_type", None),
        "config_hash": config_hash(cfg),
        "weights_probe": weights_probe(model),
        "quant": quant,
    }
