"""`distill plan`: the memory of a training step and of inference for a student, and the largest batch
that fits a GPU, from the model's config alone (distill/plan.py; formulas in docs/memory.md)."""

from __future__ import annotations

import json
from typing import Optional

import typer

# The options a plan shares with `distill train` take their defaults from its one declaration
# (students.train imports torch only inside its functions, so `--help` stays fast).
from distill.options import defaults as _defaults


def _train_defaults() -> dict:
    from students.train import TrainConfig

    return _defaults(TrainConfig)


_T = _train_defaults()


def _plan(
    student: str = typer.Option(..., "--student", help="Student model directory, config.json file or hub id (only the config is read)."),
    quant: str = typer.Option(_T["quant"], "--quant", help="Base weights: nf4, int8 or none."),
    lora_r: int = typer.Option(_T["lora_r"], "--lora-r", help="LoRA rank."),
    context: int = typer.Option(4096, "--context", help="Tokens per sequence (the padded length of a micro-batch)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Tokens per micro-batch (default: one sequence)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU memory, e.g. 24GB: also print the largest batch that fits."),
    optimizer: str = typer.Option(_T["optimizer"], "--optimizer", help="auto (paged 8-bit AdamW on a GPU, AdamW on the CPU), adamw, paged-adamw-8bit."),
    gradient_checkpointing: bool = typer.Option(_T["gradient_checkpointing"], "--gradient-checkpointing/--no-gradient-checkpointing",
                                                help="Plan with activation checkpointing (as `distill train` does by default)."),
    checkpoint_layers: str = typer.Option(_T["checkpoint_layers"], "--checkpoint-layers",
                                          help="With checkpointing: all | every:N | lean | lean+every:N (as in training)."),
    loss_chunk_size: Optional[int] = typer.Option(_T["loss_chunk_size"], "--loss-chunk-size",
                                                  help="Rows of logits per loss chunk (default: automatic, as in training)."),
    top_k: int = typer.Option(32, "--top-k", help="Teacher tokens per position in the cache."),
    lora_dropout: float = typer.Option(_T["lora_dropout"], "--lora-dropout", help="LoRA dropout (its mask is saved for backward)."),
    cpu: bool = typer.Option(False, "--cpu", help="Plan a CPU run (fp32 compute) instead of a CUDA one (bf16)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model directory to run its own code."),
) -> None:
    """Print the memory of each part of a training step and of inference, and what fits a GPU."""
    from distill.plan import gpu_budget, largest_batch, load_shape, parse_size, plan_inference, plan_training, render

    from students.model import checkpoint_policy

    every, lean = checkpoint_policy(checkpoint_layers)
    shape = load_shape(student, trust_remote_code=trust_remote_code)
    compute = "fp32" if cpu else "bf16"
    opt = optimizer if optimizer != "auto" else ("adamw" if cpu else "paged-adamw-8bit")
    kwargs = dict(quant=quant, lora_r=lora_r, optimizer=opt, gradient_checkpointing=gradient_checkpointing,
                  compute=compute, loss_chunk=loss_chunk_size, top_k=top_k, lora_dropout=lora_dropout,
                  checkpoint_every=every, lean=lean)
    plan = plan_training(shape, context=context, batch_tokens=batch_tokens, **kwargs)
    inference = plan_inference(shape, quant=quant, context=context, compute=compute)
    gpu_bytes = parse_size(gpu) if gpu else None
    best = largest_batch(shape, gpu_budget(gpu_bytes), context=context, **kwargs) if gpu_bytes else None
    if as_json:
        out = {"model": student, "shape": shape.__dict__, "training": plan.to_dict(),
               "inference": {p.name: p.bytes for p in inference}}
        if gpu_bytes:
            out["gpu"] = {"bytes": gpu_bytes, "budget": gpu_budget(gpu_bytes),
                          "largest_batch_tokens": best.settings["batch_tokens"] if best else 0}
        typer.echo(json.dumps(out, indent=1))
        return
    typer.echo(render(plan, inference, gpu_bytes=gpu_bytes, best=best))


def register(app: typer.Typer) -> None:
    app.command("plan")(_plan)
