"""The model layer: the only code in distill that loads a model or a tokenizer.

Teachers, students and the benchmark all load through here, so a model reference means the same
thing everywhere (`source`), there is one list of quantizations (`quant`), one device and dtype
policy (`devices`) and one set of one-line load errors. Importing this package does not import
torch; `head` and `sampling` (which need it) are imported by their module paths.
"""

from distill.models.devices import compute_dtype, cuda_available, default_device, parse_dtype, resolve_device
from distill.models.quant import QUANT_CHOICES, bnb_config, check_quant
from distill.models.source import ModelSource, looks_like_hub_id, resolve_source

__all__ = [
    "QUANT_CHOICES", "ModelSource", "bnb_config", "check_quant", "compute_dtype", "cuda_available",
    "default_device", "looks_like_hub_id", "parse_dtype", "resolve_device", "resolve_source",
]
