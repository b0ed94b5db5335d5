"""`distill bench`: students against teachers, with test-time compute (see distill/bench/runner.py).

The options are the fields of `BenchConfig` (`distill.options.typer_command`).
"""

from __future__ import annotations

import typer

from distill.bench.runner import BenchConfig
from distill.options import typer_command


def bench(cfg: BenchConfig) -> None:
    """Benchmark models (teacher vs students): accuracy with greedy / pass@N / maj@N / best-of-N and
    95% intervals, agreement with the teacher on a held-out cache, and cost (tokens/s, memory, size)."""
    from distill.bench.runner import run_bench

    settings = vars(cfg).copy()
    run_bench(settings.pop("models"), print_summary=True, **settings)


def register(app: typer.Typer) -> None:
    """Add `distill bench` to the top-level app."""
    app.command("bench")(typer_command(BenchConfig, bench))
