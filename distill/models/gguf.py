"""A GGUF file as a plain (unquantized) transformers model that `save_pretrained` accepts.

transformers loads GGUF (de-quantized) with `gguf_file=`, but such a model carries a
`quantization_config` and refuses `save_pretrained`. We rebuild a plain model from its config without
that field and load the de-quantized state dict into it. `teachers/gguf_import.py` saves the result
as a model directory, so packaged GGUF teachers work with no network.

One import makes transformers parse the GGUF file three times (config, tokenizer, weights: each parse
walks the whole vocabulary metadata) and rebuild gguf's tensor-name map once per module of the model
(397 times for SmolLM2); `_parse_once` memoizes both for the duration of the import, about 40% of
the import's time (profiled).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from distill.errors import DistillError
from distill.models.loading import load_model, load_tokenizer, model_from_config


def plain_model_from_gguf(file: str | Path):
    """(plain fp32 causal LM in eval mode, tokenizer with a pad token) of the GGUF `file`."""
    import torch
    from transformers import AutoConfig

    file = Path(file)
    with _parse_once():
        gguf_model = load_model(file, what="GGUF file", accept=("gguf",), device="cpu", dtype=torch.float32)
        tokenizer = load_tokenizer(file, what="GGUF file", accept=("gguf",))
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    plain = model_from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings are not separate tensors; anything else missing means a bad conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise DistillError(f"GGUF file {file} does not map onto a {config.model_type} model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval()
    if plain.generation_config is not None and tokenizer.pad_token_id is not None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    return plain, tokenizer


@contextlib.contextmanager
def _parse_once():
    """Within the block, `gguf.GGUFReader(path)` returns one reader per path and
    `gguf.get_tensor_name_map(arch, n)` one map per arguments (both are read-only once built;
    transformers imports them from the `gguf` module at each call, so the swap reaches it)."""
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
