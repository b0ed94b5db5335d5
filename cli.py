"""The `distill` command line: one typer app, each stage's commands registered from its own package.

    distill cache build|info|verify|merge teachers/commands.py  (teacher cache)
    distill teacher import-gguf|generate|filter
    distill student init, distill train, distill export     students/commands.py
    distill bench                          distill/bench/commands.py
    distill run CONFIG, distill demo       distill/pipeline/commands.py
    distill plan                           students/plan_commands.py (memory planner, distill/plan.py)

Every user mistake raises `DistillError`; `main` prints it as one line and exits 1.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes' CPU backend tries to fetch an optional kernel from the hub on import and warns when
# it cannot; with no network that warning is noise on every command (the built-in kernel is used).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)

import typer

from distill.errors import DistillError

app = typer.Typer(
    name="distill",
    help="Distil a large reasoning teacher into a small 4/8-bit student: generate and verify traces, "
    "cache the teacher's top-k log-probs, train a QLoRA student on them, export, and benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    from teachers import commands as teacher_commands
    from students import commands as student_commands
    from distill.bench import commands as bench_commands
    from distill.pipeline import commands as pipeline_commands
    from students import plan_commands

    for module in (teacher_commands, student_commands, bench_commands, pipeline_commands, plan_commands):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `distill` console script."""
    try:
        app(args=argv, standalone_mode=True)
    except DistillError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
