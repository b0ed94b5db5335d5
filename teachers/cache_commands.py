"""CLI commands (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(*apps: typer.Typer) -> None:
    """Add this module's commands to the given command groups."""
