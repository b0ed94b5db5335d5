"""Export a trained run as a checkpoint that plain `transformers` loads: merged bf16/fp16, or NF4 4-bit.

`merged`: the LoRA adapters are folded into a full-precision base. A NF4/int8 base cannot be merged
into (its weights are quantized codes), so the base is reloaded *unquantized* from the original student
path recorded in run.json, in fp32 for an exact merge, then cast to the requested dtype and written as
safetensors with the tokenizer. The result differs from the trained (quantized) model only by the base
quantization error, which the tests bound.

`bnb-4bit`: the same merged model, quantized to NF4 with double quantization and saved with its
`quantization_config`, so `AutoModelForCausalLM.from_pretrained(dir)` loads it straight into 4-bit
(bitsandbytes needed at load time).

Both write into a temporary directory that is renamed into place, with a model card (README.md).

`gguf`: the same fp32 merge written as ONE .gguf file for llama.cpp and the runtimes built on it
(students/export_gguf.py), in f16, q8_0 or q4_0 (`gguf_type`); `out` is the file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_directory

FORMATS = ("merged", "bnb-4bit", "gguf")
DTYPES = ("bf16", "fp16", "fp32")


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


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
    from peft import PeftModel

    from students.model import load_base, load_tokenizer

    student = run["student"]
    path, trc = student["path"], bool(student.get("trust_remote_code", False))
    tokenizer = load_tokenizer(path, trust_remote_code=trc)
    base = load_base(path, quant="none", device="cpu", dtype=torch.float32, trust_remote_code=trc)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as err:  # noqa: BLE001
        raise DistillError(f"cannot load the adapter in {adapter_dir} onto {path}: {' '.join(str(err).split())[:200]}") from None
    model = model.merge_and_unload()
    model = model.to(_torch_dtype(dtype))
    model.config.use_cache = True
    model.eval()
    return model, tokenizer


def export_run(run_dir: str | Path, out: str | Path, format: str = "merged", dtype: str = "bf16", *,
               checkpoint: str | None = None, overwrite: bool = False, gguf_type: str = "q8_0") -> dict:
    """Write the exported model to `out`; return a summary (format, dtype, files, parameters)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if format not in FORMATS:
        raise DistillError(f"--format {format!r} is unknown; use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise DistillError(f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    run_dir, out = Path(run_dir), Path(out)
    if format == "gguf":
        return export_gguf_run(run_dir, out, gguf_type=gguf_type, checkpoint=checkpoint, overwrite=overwrite)
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
            compute = _torch_dtype(dtype)
            model, tokenizer = merged_model(run, adapter, dtype="fp32")
            stage = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
            try:
                model.save_pretrained(str(stage), safe_serialization=True)
                tokenizer.save_pretrained(str(stage))
                del model
                qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute)
                device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
                qmodel = AutoModelForCausalLM.from_pretrained(str(stage), quantization_config=qcfg, dtype=compute,
                                                              device_map={"": device})
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
    from transformers import AutoConfig

    student = run["student"]
    try:
        config = AutoConfig.from_pretrained(student["path"], trust_remote_code=bool(student.get("trust_remote_code", False)))
    except Exception:  # noqa: BLE001 - the merge reports an unreadable student in its own words
        return
    check(config)


def _final_kl(run_dir: Path):
    summary = run_dir / "final" / "summary.json"
    try:
        return json.loads(summary.read_text()).get("final_eval_kl")
    except (OSError, ValueError):
        return None
