"""``fedpers audit``: the ledger audit (``audit ledger``) and the empirical canary audit (``audit canary``).

The short forms documented before the subcommands keep working: ``fedpers audit PATH [--budget ε]`` is
``fedpers audit ledger PATH``, and ``fedpers audit --canaries N ...`` is ``fedpers audit canary
--canaries N ...`` (see :class:`AuditGroup`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from cli.output import console, fail
from common.errors import FedpersError


class AuditGroup(TyperGroup):
    """``fedpers audit`` with the subcommand optional: arguments that name none go to one by their options.

    ``--canaries`` anywhere means the canary audit; anything else (a path, ``--budget``, nothing) the
    ledger audit. ``--help`` on its own still shows the group's help.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            canary = any(a == "--canaries" or a.startswith("--canaries=") for a in args)
            args = ["canary" if canary else "ledger", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=AuditGroup,
    short_help="Audit a run's privacy: its ledger's ε recomputed, or an empirical lower bound (--canaries).",
    help="Privacy audits: `audit ledger PATH` (also `audit PATH`) recomputes every client's ε from a run's "
    "ledger; `audit canary --canaries N` (also `audit --canaries N`) measures an empirical lower bound.",
)


@audit_app.command("ledger")
def ledger(
    path: Path = typer.Argument(None, help="a run folder (with ledger.json) or a ledger.json"),
    budget: float = typer.Option(None, help="ε budget to check against (default: the ledger's)"),
    out: Path = typer.Option(None, help="output folder (default: <run>/audit)"),
) -> None:
    """Recompute every client's ε with independent accountants (dp-accounting RDP and PLD).

    Also `fedpers audit PATH`. Exit code 1 when any client is over budget or its reported ε is
    inconsistent.
    """
    from server.audit import audit_ledger, find_ledger, rows, write_audit

    if path is None:
        fail(
            ValueError(
                "give a run folder or ledger.json to audit (fedpers audit ledger PATH), or "
                "fedpers audit canary --canaries N for the empirical audit"
            )
        )
    try:
        report = audit_ledger(path, budget)
    except FedpersError as exc:
        fail(exc)
    folder = out or find_ledger(path).parent / "audit"
    paths = write_audit(report, folder)
    table = Table("client", "ε (ours)", "ε (dp-acc. RDP)", "ε (PLD)", "budget", "steps", "status")
    table.columns[0].no_wrap = True  # a deployed device's node id has up to 20 digits: never cut it
    for row in rows(report):
        table.add_row(*row)
    Console().print(table)  # the table to stdout; the verdict with the other messages to stderr
    verdict = "[green]PASS[/]" if report["ok"] else "[bold red]FAIL[/]"
    audited = f"{len(report['clients'])} clients" + (
        " and the user-level releases" if "user_level" in report else ""
    )
    if "NOT a guarantee" in report.get("user_neighbouring", ""):
        audited += f" ({report['user_neighbouring'].split('; ', 1)[1]})"
    console.print(f"{verdict}: {audited}; report {paths['md']} and {paths['html']}")
    if not report["ok"]:
        raise typer.Exit(1)


@audit_app.command("canary")
def canary(
    canaries: int = typer.Option(..., help="how many gradient canaries to train with (m)"),
    epsilon: float = typer.Option(4.0, help="the ε claimed (σ is calibrated for it)"),
    delta: float = typer.Option(1e-5, help="δ"),
    guesses: int = typer.Option(250, help="k 'in' and k 'out' guesses (fixed in advance)"),
    sample_rate: float = typer.Option(0.1, help="Poisson sampling rate q"),
    steps: int = typer.Option(200, help="DP-SGD steps"),
    no_dp: bool = typer.Option(False, help="train without DP (shows the audit detects leakage)"),
    set_: list[str] = typer.Option(None, "--set", help="model/data overrides, e.g. model.name=tiny"),
    out: Path = typer.Option(None, help="output folder (default: runs/canary-audit-<time>)"),
) -> None:
    """Run the one-run empirical audit (Steinke, Nasr, Jagielski 2023): a lower bound on ε.

    Also `fedpers audit --canaries N`. Exit code 1 when the empirical lower bound exceeds the claimed ε.
    """
    import time

    from common.config import parse_set_options
    from common.fileio import write_json_atomic
    from server.audit.canary import AuditSetup, run_canary_audit

    dp = not no_dp
    try:
        setup = AuditSetup(
            canaries=canaries,
            guesses=guesses,
            epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            dp=dp,
        )
        overrides: dict[str, Any] = {
            "task.train-size": 500,
            "task.test-size": 10,
            **parse_set_options(set_ or []),
        }
        with console.status(
            f"training once with {canaries} canaries ({'DP' if dp else 'no DP'}, {steps} steps)…"
        ):
            result = run_canary_audit(setup, overrides)
    except (FedpersError, ValueError) as exc:
        fail(exc)
    folder = out or Path("runs") / f"canary-audit-{time.strftime('%Y%m%d-%H%M%S')}"
    write_json_atomic(folder / "canary-audit.json", result)
    claimed = f"{epsilon:g}" if dp else "∞ (no DP)"
    console.print(
        f"ε lower bound (95 %): [bold]{result['epsilon-lower-bound']:.3f}[/] vs claimed ε {claimed} at "
        f"δ={delta:g}; {result['correct']}/{result['guesses']} guesses correct; σ={result['sigma']:.3f}. "
        f"→ {folder / 'canary-audit.json'}"
    )
    if dp and result["epsilon-lower-bound"] > epsilon:
        console.print("[bold red]FAIL[/]: the empirical lower bound exceeds the claimed ε")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``audit`` group to ``app``."""
    app.add_typer(audit_app, name="audit")
