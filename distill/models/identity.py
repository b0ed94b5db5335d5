"""Which model this is, in a few short strings: recorded in a cache manifest and in every trace.

The config hash and a probe of the weights tell two checkpoints apart (two seeds, base vs fine-tune)
without hashing gigabytes, so resuming a cache or a traces file with another teacher is refused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from distill.models.source import ModelSource


def config_hash(config) -> str:
    """sha256 of the model config minus fields that do not change the function (paths, versions)."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        d.pop(key, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def weights_probe(model, per_tensor: int = 64) -> str:
    """A cheap fingerprint of the weights: hash of the first values of every parameter and buffer."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            flat = t.detach().reshape(-1)[:per_tensor]
            if flat.is_floating_point():
                flat = flat.float()
            h.update(name.encode())
            h.update(flat.cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def model_identity(model, source: ModelSource, *, quant: str = "none", revision: str | None = None) -> dict[str, Any]:
    """name_or_path (absolute for local models), revision, model type, config hash, weights probe, quant.

    A .gguf source records quant "gguf": its weights were de-quantized from the file's codes."""
    cfg = model.config
    return {
        "name_or_path": source.absolute(),
        "revision": revision or getattr(cfg, "_commit_hash", None),
        "model_type": getattr(cfg, "model_type", None),
        "config_hash": config_hash(cfg),
        "weights_probe": weights_probe(model),
        "quant": "gguf" if source.kind == "gguf" else quant,
    }
