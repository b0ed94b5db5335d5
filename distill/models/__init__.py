"""The model layer: the only code in distill that loads a model or a tokenizer.

Teachers, students and the benchmark all load through here, so a model reference means the same
thing everywhere (`source`), there is one list of quantizations (`quant`), one device and dtype
policy (`devices`), one loader with one set of one-line errors (`loading`), one model identity for
records (`identity`). `head` (final hidden states and the output head) and `sampling` (seeded batched
generation, chat prompts) are imported by their module paths: they need torch, this package does not.
"""

from distill.models.devices import (
    compute_dtype,
    cpu_compute_dtype,
    cpu_native_half,
    cuda_available,
    default_device,
    parse_dtype,
    resolve_device,
)
from distill.models.identity import config_hash, model_identity, weights_probe
from distill.models.loading import attach_adapter, load_config, load_model, load_tokenizer, model_from_config, one_line
from distill.models.quant import QUANT_CHOICES, bnb_config, check_quant
from distill.models.source import ModelSource, looks_like_hub_id, resolve_source

__all__ = [
    "QUANT_CHOICES", "ModelSource", "attach_adapter", "bnb_config", "check_quant", "compute_dtype", "config_hash",
    "cpu_compute_dtype", "cpu_native_half", "cuda_available", "default_device", "load_model", "load_tokenizer", "looks_like_hub_id", "model_from_config",
    "model_identity", "one_line", "parse_dtype", "resolve_device", "resolve_source", "weights_probe",
]
