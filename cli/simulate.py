"""``fedpers simulate``: a local federation (one mode, or several compared), with progress and its log."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.output import console, fail
from common import protocol as P
from common.errors import ConfigError, FedpersError


def simulate(
    config: Path = typer.Option(None, "--config", "-c", help="simulation TOML (simulations/configs/*.toml)"),
    set_: list[str] = typer.Option(None, "--set", help="override a run-config key: --set dp.epsilon=3"),
    compare: str = typer.Option(
        "", help="comma-separated modes to run side by side, e.g. fedper,local,fedavg"
    ),
    run_dir: Path = typer.Option(None, help="output folder (default runs/<config>-<time>)"),
    clients: int = typer.Option(0, help="number of simulated clients (default: from the config)"),
    ray_address: str = typer.Option(
        None,
        help="join this running Ray cluster (its head's host:port, or auto) instead of starting Ray here "
        "(default: [simulation] ray-address)",
    ),
    client_gpus: str = typer.Option(
        None, help="GPUs per simulated client, a Ray resource (default: [simulation] client-gpus, else 0)"
    ),
    sequential: bool = typer.Option(
        False,
        help="run the same ServerApp and ClientApps in this process, one client after another, no Ray "
        "(quick sweeps, speed floor)",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Flower/Ray/library output on the console (else <run>/log.txt)"
    ),
) -> None:
    """Run a local federation on Flower's simulation engine and write runs/<id>/.

    The console shows progress, fedpers' warnings (each once) and the results; Flower's, Ray's and the
    libraries' output goes to <run>/log.txt (with --verbose, to the console as well as Flower's lines to
    log.txt).
    """
    from dataclasses import replace

    from common.config import parse_set_options
    from simulations.compare import compare as run_compare
    from simulations.compare import table
    from simulations.preflight import check_modes
    from simulations.run import check_ray_cluster, load_settings, new_run_id
    from simulations.run import client_gpus as valid_gpus
    from simulations.run import ray_address as valid_address
    from simulations.run import simulate as run_sim

    try:
        asked = tuple(m.strip() for m in compare.split(",") if m.strip())
        settings = load_settings(config, parse_set_options(set_ or []), asked)
        if clients:
            settings = replace(settings, num_clients=clients)
        if client_gpus is not None:
            settings = replace(settings, client_gpus=valid_gpus(_number(client_gpus), "--client-gpus"))
        if ray_address is not None:
            settings = replace(settings, ray_address=valid_address(ray_address, "--ray-address"))
        if settings.ray_address and sequential:
            raise ConfigError("--sequential runs without Ray; it cannot join the Ray cluster at ray-address")
        if settings.ray_address:
            check_ray_cluster(settings.ray_address)  # seconds, where Ray itself would retry for minutes
        modes = asked or settings.compare
        roster = check_modes(settings, modes)  # every data file and client share, before any folder
    except FedpersError as exc:
        from rich.markup import escape

        fail(FedpersError(escape(str(exc))))  # "[simulation] key" is text, not a console style
    if roster.note:
        console.print(f"data: {roster.note}", soft_wrap=True, markup=False)
    out = run_dir or Path("runs") / new_run_id(config.stem if config else "sim")
    if settings.ray_address:
        out = out.resolve()  # every path derived from it must mean the same on the cluster's workers
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]fedpers simulate[/] → {out}  ({settings.num_clients} clients"
        f"{', modes ' + ', '.join(modes) if modes else ''}"
        f"{', on the Ray cluster at ' + settings.ray_address if settings.ray_address else ''})"
    )
    from simulations.run_log import LOG_NAME, run_log

    with (
        run_log(out / LOG_NAME, verbose, _warn) as terminal,
        _console_to(terminal),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            redirect_stdout=verbose,  # quiet: prints go to the log, not above the bars
            redirect_stderr=verbose,
        ) as progress,
    ):
        tasks: dict[str, Any] = {}

        def on_round(mode: str, line: dict[str, Any]) -> None:
            if mode not in tasks:
                tasks[mode] = progress.add_task(f"{mode:>10}", total=line["total_rounds"], info="")
            score = P.headline(lambda s: f"{s.metric}-mean" in line)
            mean = line.get(f"{score.metric}-mean")
            info = f"{score.name} {mean:.3f}" if mean is not None else ""
            if "epsilon-max" in line:
                info += f"  ε≤{line['epsilon-max']:.2f}"
            progress.update(tasks[mode], completed=line["round"], info=info)

        try:
            if modes:
                rows = run_compare(settings, modes, out, on_round, roster.users, sequential)
            else:
                mode = str(settings.overrides.get("personalization.mode", "default"))
                summary = run_sim(settings, out, lambda line: on_round(mode, line), roster.users, sequential)
                rows = [{"mode": mode, **summary}]
        except Exception as exc:
            _simulation_failed(exc, out, created, verbose)
    Console().print(table(rows))
    if (out / "paired.md").is_file():  # the first mode against each other one, paired over clients
        Console().print((out / "paired.md").read_text())
    report = out / (modes[0] if modes else "") / "report.md"
    console.print(f"report: {report}" if report.exists() else f"outputs: {out}")
    console.print(f"log: {out / LOG_NAME}")


def _number(text: str) -> float | str:
    """``text`` as a float where it reads as one (its validator then judges it), else ``text`` itself."""
    try:
        return float(text)
    except ValueError:
        return text


def _warn(message: str) -> None:
    """A fedpers warning during a quiet run, on the console."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


@contextlib.contextmanager
def _console_to(terminal: TextIO | None) -> Iterator[None]:
    """Point the console at ``terminal`` (the real one while fds 1/2 go to the log); None: unchanged."""
    if terminal is None:
        yield
        return
    console.file = terminal
    try:
        yield
    finally:
        console.file = None  # type: ignore[assignment]  # back to sys.stderr


def _simulation_failed(exc: Exception, out: Path, created: bool, verbose: bool) -> NoReturn:
    """One line for a failed run that points to its log; a refused run's unfinished folder is removed."""
    from rich.markup import escape

    from simulations.preflight import remove_unfinished
    from simulations.run_log import LOG_NAME, keep_log

    log: Path | None = out / LOG_NAME
    if not isinstance(exc, FedpersError):
        traceback.print_exc()  # into the log (onto the console with --verbose)
    elif created:  # a fedpers error: no half-made run is left behind, its log is kept beside it
        kept = keep_log(out)
        if remove_unfinished(out):
            log = kept
        elif kept is not None:
            kept.unlink()
    where = f"; the full log is in {log}" if log is not None and not verbose else ""
    console.print(f"[bold red]error:[/] {escape(str(exc))}{where}", soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, FedpersError) else 1)


def register(app: typer.Typer) -> None:
    """Add ``simulate`` to ``app``."""
    app.command()(simulate)
