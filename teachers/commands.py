"""Teacher-side CLI: `distill cache ...` and `distill teacher ...`, registered by `cli.py`.

The cache commands live in `teachers/cache_commands.py`, the trace commands (generate, filter) in
`teachers/trace_commands.py`; this module only creates the two command groups.
"""

from __future__ import annotations

import typer

cache_app = typer.Typer(help="Build, inspect, verify and merge teacher caches (top-k log-probs on disk).", no_args_is_help=True)
teacher_app = typer.Typer(help="Run a teacher: import GGUF models, generate reasoning traces, filter them.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from teachers import cache_commands, trace_commands

    cache_commands.register(cache_app, teacher_app)
    trace_commands.register(teacher_app)
    app.add_typer(cache_app, name="cache")
    app.add_typer(teacher_app, name="teacher")
