"""`distill teacher generate` and `distill teacher filter`: reasoning traces and their rule rewards.

The options are the fields of `GenerateConfig` and `FilterConfig` (`distill.options.typer_command`).
"""

from __future__ import annotations

import typer

from distill.options import typer_command
from teachers.filter import FilterConfig
from teachers.generate import GenerateConfig


def generate(cfg: GenerateConfig) -> None:
    """Sample reasoning traces from a teacher (resumable; progress bar with tokens/s).

    Under `accelerate launch --multi_gpu --num_processes N` the N processes share the problems (docs/scale-out.md)."""
    from teachers.generate import generate_traces

    summary = generate_traces(**vars(cfg))
    if summary.get("processes", 1) > 1 and not _is_main():
        return
    st = summary["stats"]
    typer.echo(f"wrote {summary['written']} traces ({summary['skipped']} already done) for "
               f"{summary['problems']} problems x {summary['samples']} samples to {summary['out']}; "
               f"{st['new_tokens']} tokens in {st['seconds']:.1f}s = {st['tokens_per_s']:.1f} tok/s")


def _is_main() -> bool:
    from distill.ranks import current_ranks

    return current_ranks().is_main


def filter_cmd(cfg: FilterConfig) -> None:
    """Score traces with rule rewards and keep the correct ones; report yield per prompt and overall."""
    from teachers.filter import filter_traces

    filter_traces(echo=typer.echo, **vars(cfg))


def register(teacher_app: typer.Typer) -> None:
    """Add `generate` and `filter` to the `distill teacher` group."""
    teacher_app.command("generate")(typer_command(GenerateConfig, generate))
    teacher_app.command("filter")(typer_command(FilterConfig, filter_cmd))
