"""The console every ``fedpers`` command writes to (stderr) and its one-line error exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console(stderr=True)


def fail(exc: Exception) -> NoReturn:
    """Print ``exc`` as one error line and exit with code 2 (a usage or input error)."""
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # one line, whatever the terminal width
    raise typer.Exit(2)
