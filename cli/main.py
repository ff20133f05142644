"""``fedpers``: one CLI whose commands call into the side they belong to.

Each command group lives in its own module with a ``register(app)``; this one only assembles them, in the
order ``fedpers --help`` lists them (top-level commands first, then the groups).
"""

from __future__ import annotations

import os
import sys

import typer

from cli import assets, assistant, audit, bench, deploy, predict, recommend, simulate
from cli.output import console
from common.errors import FedpersError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated DP-LoRA personalization.")
for _group in (simulate, predict, recommend, assistant, deploy, assets, audit, bench):
    _group.register(app)


def main() -> None:
    """Entry point with clean error exits."""
    try:
        app()
    except FedpersError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
