"""CLI commands of this stage, registered on the `distill` app by `cli.py`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
