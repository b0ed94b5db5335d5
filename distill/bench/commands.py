"""`distill bench`: students against teachers, with test-time compute (see distill/bench/runner.py)."""

from __future__ import annotations

from typing import List, Optional

import typer

from distill.bench.runner import DEFAULT_RULES


def bench(
    model: List[str] = typer.Option(..., "--model", "-m", help="NAME=PATH of a model to benchmark (repeatable): a model directory, an adapter directory, or a .gguf file."),
    task: str = typer.Option("synthetic", "--task", help="gsm8k (test split) | synthetic | FILE (JSONL with question/answer)."),
    out: str = typer.Option(..., "--out", "-o", help="Directory for results.json, results.md, samples.jsonl and the PNG plots."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N problems."),
    samples: int = typer.Option(1, "--samples", "-n", help="Sampled completions per problem (N) for pass@N, maj@N, best-of-N."),
    select: str = typer.Option(DEFAULT_RULES, "--select", help="Comma-separated selection rules: greedy,pass@n,majority,best-of-n,weighted-best-of-n."),
    scorer: str = typer.Option("self", "--scorer", help="'self' (the model's own mean token log-prob) or a reward model directory (sequence classification)."),
    held_out_cache: Optional[str] = typer.Option(None, "--held-out-cache", help="Teacher cache to measure KL, top-1 agreement and ECE against."),
    held_out_limit: Optional[int] = typer.Option(None, "--held-out-limit", help="Use the first N samples of the held-out cache."),
    quant: str = typer.Option("auto", "--quant", help="auto (as saved; adapters on an NF4 base) | none | nf4 | int8."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature of the N samples (greedy is separate)."),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows generated together (tokens/s is measured batched)."),
    seed: int = typer.Option(0, "--seed"),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Default: the prompt traces were generated with."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model directories to run their own code."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Benchmark models (teacher vs students): accuracy with greedy / pass@N / maj@N / best-of-N and
    95% intervals, agreement with the teacher on a held-out cache, and cost (tokens/s, memory, size)."""
    from distill.bench.runner import run_bench

    run_bench(
        model, task=task, out=out, limit=limit, samples=samples, select=select, scorer=scorer,
        held_out_cache=held_out_cache, held_out_limit=held_out_limit, quant=quant, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
        system_prompt=system_prompt, trust_remote_code=trust_remote_code, progress=progress, print_summary=True,
    )


def register(app: typer.Typer) -> None:
    """Add `distill bench` to the top-level app."""
    app.command("bench")(bench)
