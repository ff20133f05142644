"""``fedpers predict``: classify texts, or tag their entities, offline with a client's personal model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.output import fail
from common.errors import FedpersError


def predict(
    texts: list[str] = typer.Argument(..., help="texts to classify (or tag, for an entity tagger)"),
    state_dir: Path = typer.Option(
        ..., help="the client's state folder (e.g. runs/<run>/clients/client-0000)"
    ),
    key_file: Path = typer.Option(
        None, help="state key file (default: <state-dir>/state.key or $FEDPERS_STATE_KEY)"
    ),
) -> None:
    """Classify texts (or tag their entities) offline with the shared adapters and this user's own part."""
    from client.predict import predict as run_predict

    try:
        results = run_predict(state_dir, texts, key_file)
    except (FedpersError, ValueError) as exc:
        fail(exc)
    table = Table(*results[0].columns)
    for r in results:
        table.add_row(*r.row())
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``predict`` to ``app``."""
    app.command()(predict)
