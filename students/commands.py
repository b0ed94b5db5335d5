"""CLI commands of the student stage: `distill train`, `distill student init`, `distill export`.

Heavy imports (torch, transformers) happen inside the commands so that `distill --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

student_app = typer.Typer(help="Build students: keep a subset of the teacher's layers.", no_args_is_help=True)


def _init(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model directory (or hub id)."),
    out: Path = typer.Option(..., "--out", help="New model directory for the student."),
    keep_layers: str = typer.Option("every:2", "--keep-layers", help="Layers to keep: every:N, first:N, last:N or a list like 0,2,4-7."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model directory to run its own code."),
) -> None:
    """Make a student from the teacher by keeping a subset of its decoder layers (same tokenizer)."""
    from students.init_student import init_student

    summary = init_student(teacher, out, keep_layers, trust_remote_code=trust_remote_code)
    typer.echo(f"student with {summary['student_layers']}/{summary['teacher_layers']} layers "
               f"({summary['parameters']:,} parameters, kept {summary['kept_layers']}) written to {out}")


def _train(
    student: str = typer.Option(..., "--student", help="Student model directory or hub id."),
    cache: Path = typer.Option(..., "--cache", help="Teacher cache directory (from `distill cache build`)."),
    out: Path = typer.Option(..., "--out", help="Run directory (run.json, metrics.jsonl, checkpoints/, final/)."),
    quant: str = typer.Option("nf4", "--quant", help="Base weights: nf4 (4-bit, double quant), int8, or none."),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: int = typer.Option(32, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Comma-separated module names (default: all linear layers)."),
    loss: str = typer.Option("forward-kl", "--loss", help="forward-kl (top-k + tail), forward-kl-renorm, reverse-kl or jsd."),
    temperature: float = typer.Option(1.0, "--temperature", help="Training temperature (KD term scaled by T^2)."),
    kd_weight: float = typer.Option(1.0, "--kd-weight"),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="Weight of cross-entropy on the completion tokens."),
    jsd_beta: float = typer.Option(0.5, "--jsd-beta"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch)."),
    epochs: Optional[float] = typer.Option(None, "--epochs"),
    lr: float = typer.Option(2e-4, "--lr"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Default: 3% of the steps."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm"),
    optimizer: str = typer.Option("auto", "--optimizer", help="auto (paged 8-bit AdamW on CUDA, AdamW on CPU), adamw, paged-adamw-8bit."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per micro-batch (default 8)."),
    batch_tokens: Optional[str] = typer.Option(None, "--batch-tokens", help="Padded tokens per micro-batch (instead of --batch-size), or auto: the largest that `distill plan` fits in this GPU's free memory (CPU: half the available RAM)."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    eval_fraction: float = typer.Option(0.05, "--eval-fraction", help="Held-out share of the cache (deterministic split)."),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="Cap on held-out samples evaluated."),
    eval_every: int = typer.Option(50, "--eval-every", help="Evaluate every N steps (0: only at the end)."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps (0: never)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints"),
    loss_chunk_size: int = typer.Option(512, "--loss-chunk-size", help="Rows of logits per loss chunk."),
    no_gradient_checkpointing: bool = typer.Option(False, "--no-gradient-checkpointing"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Train a quantized LoRA student on a teacher cache with the chunked sparse-KD loss."""
    from students.train import TrainConfig, train

    if batch_tokens is not None and batch_tokens != "auto":
        try:
            batch_tokens = int(batch_tokens)
        except ValueError:
            from distill.errors import DistillError

            raise DistillError(f"--batch-tokens must be a number of tokens or auto, got {batch_tokens!r}") from None
    cfg = TrainConfig(
        student=student, cache=str(cache), out=str(out), quant=quant, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None,
        gradient_checkpointing=not no_gradient_checkpointing, trust_remote_code=trust_remote_code,
        loss=loss, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, jsd_beta=jsd_beta,
        loss_chunk_size=loss_chunk_size, steps=steps, epochs=epochs, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, optimizer=optimizer, batch_size=batch_size,
        batch_tokens=batch_tokens, grad_accum=grad_accum, eval_fraction=eval_fraction, eval_samples=eval_samples,
        eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints, seed=seed,
        progress=not no_progress, resume=resume,
    )
    summary = train(cfg)
    if summary.get("batch_plan"):
        typer.echo(summary["batch_plan"]["message"])
    kl = summary.get("final_eval_kl")
    agree = summary.get("final_top1_agreement")
    typer.echo(f"trained {summary['steps']} steps; held-out KL {kl if kl is None else f'{kl:.4f}'}, "
               f"top-1 agreement {agree if agree is None else f'{agree:.3f}'}; adapters in {summary['final_dir']}")


def _export(
    run: Path = typer.Argument(..., help="Run directory of `distill train`."),
    out: Path = typer.Option(..., "--out", help="Directory for the exported model (the .gguf file for --format gguf)."),
    format: str = typer.Option("merged", "--format", help="merged (bf16/fp16 safetensors), bnb-4bit (loads straight into NF4) or gguf (one file for llama.cpp)."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32 (compute dtype for bnb-4bit)."),
    gguf_type: str = typer.Option("q8_0", "--gguf-type", help="Tensor type of --format gguf: f16, q8_0, q4_0 (or f32)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Export a checkpoint (step-XXXXXX or latest) instead of final/."),
) -> None:
    """Export a trained run as a model that `AutoModelForCausalLM.from_pretrained` loads, or as a GGUF file."""
    from students.export import export_run

    summary = export_run(run, out, format=format, dtype=dtype, checkpoint=checkpoint, gguf_type=gguf_type)
    if summary["format"] == "gguf":
        typer.echo(f"exported {summary['architecture']} GGUF ({summary['gguf_type']}, {summary['bytes'] / 2**20:.1f} MiB) to {summary['out']}")
        return
    typer.echo(f"exported {summary['format']} ({summary['dtype']}) model to {summary['out']}")


student_app.command("init")(_init)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
    app.add_typer(student_app, name="student")
    app.command("train")(_train)
    app.command("export")(_export)
