"""``fedpers recommend``: rank items offline by a client's personal model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.output import fail
from common.errors import FedpersError


def recommend(
    items: list[str] = typer.Argument(None, help="items to rank (texts); or --items FILE"),
    state_dir: Path = typer.Option(
        ..., help="the client's state folder (e.g. runs/<run>/clients/client-0000)"
    ),
    items_file: Path = typer.Option(None, "--items", help="a text file of items, one per line"),
    label: str = typer.Option(None, help="the label that means 'wanted' (default: liked)"),
    top: int = typer.Option(10, help="how many to show (0 = all)"),
    key_file: Path = typer.Option(
        None, help="state key file (default: <state-dir>/state.key or $FEDPERS_STATE_KEY)"
    ),
) -> None:
    """Rank items offline for this user: the personal model's probability of --label, highest first."""
    from client.recommend import read_items
    from client.recommend import recommend as run_recommend

    try:
        given = list(items or []) + (read_items(items_file) if items_file is not None else [])
        ranked = run_recommend(state_dir, given, label, top, key_file)
    except (FedpersError, ValueError) as exc:
        fail(exc)
    table = Table("rank", f"p({label or 'liked'})", "item")
    for r in ranked:
        table.add_row(str(r.rank), f"{r.score:.3f}", r.item[:90])
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``recommend`` to ``app``."""
    app.command()(recommend)
