"""Export a trained run as a checkpoint that plain `transformers` loads: merged bf16/fp16, or NF4 4-bit.

`merged`: the LoRA adapters are folded into a full-precision base. A NF4/int8 base cannot be merged
into (its weights are quantized codes), so the base is reloaded *unquantized* from the original student
path recorded in run.json, in fp32 for an exact merge, then cast to the requested dtype and written as
safetensors with the tokenizer. The result differs from the trained (quantized) model only by the base
quantization error, which the tests bound.

`bnb-4bit`: the same merged model, quantized to NF4 with double quantization and saved with its
`quantization_config`, so transformers loads the directory straight into 4-bit (bitsandbytes needed
at load time).

Both write into a temporary directory that is renamed into place, with a model card (README.md).

`gguf`: the same fp32 merge written as ONE .gguf file for llama.cpp and the runtimes built on it
(students/export_gguf.py), in f16, q8_0, q4_1 or q4_0 (`gguf_type`); `out` is the file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from dataclasses import dataclass

from distill.errors import DistillError
from distill.io import atomic_directory
from distill.models.devices import DTYPE_NAMES as DTYPES
from distill.options import option, validate
from students.export_gguf import GGUF_TYPES  # the tensor types the GGUF writer knows, declared there

FORMATS = ("merged", "bnb-4bit", "gguf")


@dataclass
class ExportConfig:
    """`distill export` and the `[export]` section of a run config (declared once)."""

    run: Path = option(help="Run directory of `distill train`.", argument=True)
    out: Path = option(help="Directory for the exported model (the .gguf file for --format gguf).")
    format: str = option("merged", "merged (bf16/fp16 safetensors), bnb-4bit (loads straight into NF4) or gguf "
                         "(one file for llama.cpp).", choices=FORMATS)
    dtype: str = option("bf16", "Weights dtype (merged) or compute dtype (bnb-4bit).", choices=tuple(DTYPES))
    gguf_type: str = option("q8_0", "Tensor type of --format gguf: f16, q8_0, q4_1, q4_0 (or f32).", choices=GGUF_TYPES)
    checkpoint: str | None = option(None, "Export a checkpoint (step-XXXXXX or latest) instead of final/.")


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise DistillError(f"{run_dir} is not a training run (no run.json); pass the --out directory of `distill train`")
    try:
        return json.loads(run_file.read_text())
    except ValueError:
        raise DistillError(f"{run_file} is not valid JSON; the run directory is damaged") from None


def adapter_dir_of(run_dir: Path, checkpoint: str | None = None) -> Path:
    """final/ by default; `checkpoint` = "latest" or a step-XXXXXX name picks a checkpoint instead."""
    from students.checkpoint import list_checkpoints

    if checkpoint is None:
        d = run_dir / "final"
        if not (d / "adapter_model.safetensors").is_file():
            raise DistillError(f"{run_dir} has no final adapter (training did not finish); finish it with --resume or export --checkpoint latest")
        return d
    ckpts = list_checkpoints(run_dir)
    if checkpoint == "latest":
        if not ckpts:
            raise DistillError(f"{run_dir} has no checkpoints")
        return ckpts[-1]
    d = run_dir / "checkpoints" / checkpoint
    if d not in ckpts:
        raise DistillError(f"{run_dir} has no checkpoint {checkpoint!r}; choose one of {[c.name for c in ckpts]}")
    return d


def merged_model(run: dict, adapter_dir: Path, *, dtype: str = "bf16"):
    """The base reloaded unquantized (fp32) with the run's adapters merged in, cast to `dtype`. Returns (model, tokenizer)."""
    import torch

    from distill.models import load_model, load_tokenizer, parse_dtype

    student = run["student"]
    path, trc = student["path"], bool(student.get("trust_remote_code", False))
    tokenizer = load_tokenizer(path, what="student", trust_remote_code=trc)
    model = load_model(path, what="student", quant="none", device="cpu", dtype=torch.float32, trust_remote_code=trc,
                       adapter=adapter_dir)
    model = model.merge_and_unload()
    model = model.to(parse_dtype(dtype))
    model.config.use_cache = True
    model.eval()
    return model, tokenizer


def export_run(run: str | Path, out: str | Path, *, overwrite: bool = False, **settings) -> dict:
    """Write the exported model to `out`; return a summary (format, dtype, files, parameters).

    `settings` are the other `ExportConfig` fields (format, dtype, checkpoint), checked there.
    """
    from distill.models import default_device, load_model, parse_dtype

    cfg = validate(ExportConfig(run=Path(run), out=Path(out), **settings))
    run_dir, out, format, dtype, checkpoint = cfg.run, cfg.out, cfg.format, cfg.dtype, cfg.checkpoint
    if format == "gguf":
        return export_gguf_run(run_dir, out, gguf_type=cfg.gguf_type, checkpoint=checkpoint, overwrite=overwrite)
    run = read_run(run_dir)
    adapter = adapter_dir_of(run_dir, checkpoint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DistillError(f"--out {out} already exists and is not empty; choose a new directory")
    with atomic_directory(out) as tmp:
        if format == "merged":
            model, tokenizer = merged_model(run, adapter, dtype=dtype)
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        else:
            # Merge in fp32, save, then reload through bitsandbytes so the saved weights are NF4 codes.
            compute = parse_dtype(dtype)
            model, tokenizer = merged_model(run, adapter, dtype="fp32")
            stage = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
            try:
                model.save_pretrained(str(stage), safe_serialization=True)
                tokenizer.save_pretrained(str(stage))
                del model
                qmodel = load_model(stage, what="merged model", quant="nf4", dtype=compute, device=default_device(),
                                    compute=False)  # re-saved only: the compute dtype asked is what is saved
                qmodel.save_pretrained(str(tmp), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
                model = qmodel
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        from students.model_card import write_model_card

        summary = {"format": format, "dtype": dtype, "run_dir": str(run_dir), "adapter": str(adapter), "out": str(out),
                   "parameters": sum(p.numel() for p in model.parameters())}
        write_model_card(tmp, run, run_dir, summary)
    summary["files"] = sorted(p.name for p in out.iterdir())
    return summary


def export_gguf_run(run_dir: Path, out: Path, *, gguf_type: str = "q8_0", checkpoint: str | None = None,
                    overwrite: bool = False) -> dict:
    """The run's fp32 merge written as one GGUF file `out` (see students/export_gguf.py)."""
    from students.export_gguf import GGUF_TYPES, gguf_architecture, write_gguf

    if gguf_type not in GGUF_TYPES:
        raise DistillError(f"--gguf-type {gguf_type!r} is unknown; use one of {', '.join(GGUF_TYPES)}")
    if out.suffix.lower() != ".gguf":
        raise DistillError(f"--out {out} must name the .gguf file to write for --format gguf (e.g. student-{gguf_type}.gguf)")
    if out.exists() and not overwrite:
        raise DistillError(f"--out {out} already exists; choose a new file name")
    run = read_run(run_dir)
    adapter = adapter_dir_of(run_dir, checkpoint)
    _check_gguf_architecture(run, gguf_architecture)
    model, tokenizer = merged_model(run, adapter, dtype="fp32")
    kl = _final_kl(run_dir)
    description = (f"distill student of {run.get('cache', {}).get('teacher') or 'a teacher'}, "
                   f"{run.get('loss', {}).get('name', 'kd')} loss" + (f", held-out KL {kl:.4f}" if kl is not None else ""))
    summary = write_gguf(model, tokenizer, out, gguf_type, name=Path(str(run["student"]["path"])).name or "student",
                         description=description)
    summary.update(format="gguf", dtype="fp32-merge", run_dir=str(run_dir), adapter=str(adapter), out=str(out),
                   parameters=sum(p.numel() for p in model.parameters()), files=[out.name])
    return summary


def _check_gguf_architecture(run: dict, check) -> None:
    """Refuse an unsupported architecture before the (slow) merge, from the student's config alone."""
    from distill.models import load_config

    student = run["student"]
    try:
        config = load_config(student["path"], what="student", trust_remote_code=bool(student.get("trust_remote_code", False)))
    except DistillError:  # the merge reports an unreadable student in its own words
        return
    check(config)


def _final_kl(run_dir: Path):
    summary = run_dir / "final" / "summary.json"
    try:
        return json.loads(summary.read_text()).get("final_eval_kl")
    except (OSError, ValueError):
        return None
