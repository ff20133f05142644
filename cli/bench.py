"""``fedpers bench``: the benchmarks, each writing runs/bench-<name>-<time>/ and updating BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.options import split_csv
from cli.output import console, fail
from common.errors import ConfigError, FedpersError
from simulations.bench.lm_tune import CANDIDATES as LM_CANDIDATES

bench_app = typer.Typer(help="Benchmarks: each writes runs/bench-<name>-<time>/ and updates BENCHMARKS.md.")


def _grid_progress(label: str) -> tuple[Progress, Any]:
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _bench(call: Any) -> None:
    """Run a benchmark call, print its table and where its outputs are; clean errors."""
    try:
        run, table = call()
    except (FedpersError, ValueError, RuntimeError) as exc:
        fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


@bench_app.command("list")
def bench_list() -> None:
    """Show the benchmarks."""
    from simulations.bench.commands import bench_names

    table = Table("benchmark", "measures")
    for name, what in bench_names().items():
        table.add_row(name, what)
    Console().print(table)


@bench_app.command("comm")
def bench_comm_cmd(no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md")) -> None:
    """Bytes up/down per client per round for every mode and LoRA rank 4/8/16."""
    from simulations.bench.commands import bench_comm

    _bench(lambda: bench_comm(publish=not no_publish))


@bench_app.command("dp-cost")
def bench_dp_cost_cmd(
    batches: str = typer.Option("16,32,64", help="comma-separated expected batch sizes"),
    repeats: int = typer.Option(3, help="interleaved repeats per variant (median reported)"),
    threads: int = typer.Option(2, help="torch threads"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps (CUDA: allocator peak memory)"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
) -> None:
    """Time per step and peak memory: non-private vs Opacus hooks, functorch, ghost."""
    from simulations.bench.commands import bench_dp_cost

    batch_sizes = [int(b) for b in split_csv(batches)]
    _bench(lambda: bench_dp_cost(batch_sizes, repeats, threads, publish=not no_publish, device=device))


@bench_app.command("sim-speed")
def bench_sim_speed_cmd(
    workload: str = typer.Option(
        "classic", help="classic | cross-device (issue #31: 1,000 users, user-level DP)"
    ),
    clients: int | None = typer.Option(
        None, "--clients", "--population", help="simulated clients, the population (default 10 / 1000)"
    ),
    rounds: int | None = typer.Option(None, help="rounds (default 4 classic, 20 cross-device)"),
    repeats: int = typer.Option(3, help="timed runs per runner, interleaved (median and min-max reported)"),
    threads: int = typer.Option(2, help="torch threads of the floor (and of pfl with --pfl-workers 1)"),
    actors: str = typer.Option(
        "2,1", help="Flower actor counts to probe (one run each; the fastest is timed)"
    ),
    pfl_workers: int = typer.Option(
        2, help="pfl worker processes under torchrun, 1 thread each (1 = one process)"
    ),
    runners: str = typer.Option("floor,flower,pfl", help="comma-separated: floor, flower, pfl, sequential"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
) -> None:
    """The same workload on Flower, as bare compute (the floor) and on pfl-research: interleaved, repeated."""
    from simulations.bench.sim_speed import bench_sim_speed

    def call() -> Any:
        return bench_sim_speed(
            workload, clients, rounds=rounds, repeats=repeats, threads=threads,
            actors=[int(a) for a in split_csv(actors)], pfl_workers=pfl_workers, runners=split_csv(runners),
            publish=not no_publish,
        )  # fmt: skip

    _bench(call)


@bench_app.command("scale")
def bench_scale_cmd(
    populations: str = typer.Option("50,150,300,600", help="comma-separated population sizes"),
    cohort: int = typer.Option(20, help="clients sampled per round"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
) -> None:
    """Population 50 → 600 with a fixed cohort: wall per round, peak RSS, state per user."""
    from simulations.bench.commands import bench_scale

    _bench(lambda: bench_scale([int(p) for p in split_csv(populations)], cohort, publish=not no_publish))


@bench_app.command("tune")
def bench_tune_cmd(
    workers: int = typer.Option(2, help="worker processes (one thread each)"),
    run_dir: Path = typer.Option(None, help="folder to resume"),
    modes: str = typer.Option("fedper,local", help="comma-separated modes to tune"),
    server_lrs: str = typer.Option("1", help="comma-separated fed.server-lr candidates (shared modes only)"),
    no_write: bool = typer.Option(
        False, help="write the choice into the run folder, not simulations/configs/bench-tuned.toml"
    ),
) -> None:
    """Choose learning rates on validation splits → simulations/configs/bench-tuned.toml."""
    from simulations.bench.commands import bench_tune

    progress, update = _grid_progress("tuning cells")
    try:
        try:
            slrs = [float(v) for v in split_csv(server_lrs)]
        except ValueError as exc:
            raise ConfigError(f"--server-lrs must be comma-separated numbers, got {server_lrs!r}") from exc
        with progress:
            run, table = bench_tune(workers, run_dir, update, split_csv(modes), slrs, write=not no_write)
    except FedpersError as exc:
        fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


@bench_app.command("lm-tune")
def bench_lm_tune_cmd(
    candidates: str = typer.Option(",".join(LM_CANDIDATES), help="comma-separated candidates, in run order"),
    modes: str = typer.Option("fedper,local,fedavg", help="comma-separated modes (each tuned alike)"),
    workers: int = typer.Option(2, help="worker processes (one thread each)"),
    run_dir: Path = typer.Option(None, help="folder of an earlier run to resume (finished cells are kept)"),
    no_write: bool = typer.Option(False, help="do not rewrite simulations/configs/shakespeare-tuned.toml"),
    report_only: bool = typer.Option(False, help="tabulate the cells finished in --run-dir, run nothing"),
) -> None:
    """Tune the generative assistant per mode on validation splits → shakespeare-tuned.toml."""
    from simulations.bench.commands import bench_lm_tune

    progress, update = _grid_progress("lm-tune cells")
    try:
        with progress:
            run, table = bench_lm_tune(
                split_csv(candidates), split_csv(modes), workers, run_dir, update,
                write=not no_write, report_only=report_only,
            )  # fmt: skip
    except (FedpersError, ValueError) as exc:
        fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


@bench_app.command("quality")
def bench_quality_cmd(
    settings: str = typer.Option("tweets-a0.3,tweets-a1.0,news", help="comma-separated settings"),
    privacy: str = typer.Option("eps8,none,eps3,eps1", help="comma-separated privacy levels"),
    modes: str = typer.Option("local,fedavg,fedavg-ft,fedper,fedsa,ffa", help="comma-separated modes"),
    seeds: int = typer.Option(3, help="number of seeds (0..n-1)"),
    workers: int = typer.Option(2, help="worker processes (one thread each)"),
    run_dir: Path = typer.Option(None, help="folder of an earlier run to resume (finished cells are kept)"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
    report_only: bool = typer.Option(False, help="tabulate the cells finished in --run-dir, run nothing"),
) -> None:
    """Per-client accuracy for every mode × privacy × seed (resumable)."""
    from simulations.bench.commands import bench_quality

    progress, update = _grid_progress("quality cells")
    try:
        with progress:
            run, table = bench_quality(
                split_csv(settings), split_csv(privacy), split_csv(modes), list(range(seeds)),
                workers, run_dir, update, publish=not no_publish, report_only=report_only,
            )  # fmt: skip
    except (FedpersError, ValueError) as exc:
        fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


@bench_app.command("cross-device")
def bench_cross_device_cmd(
    settings: str = typer.Option("tweets-a1.0,tweets-a0.3,news", help="comma-separated settings"),
    privacy: str = typer.Option("user-eps8,user-eps2", help="comma-separated user-level budgets (or none)"),
    modes: str = typer.Option(
        "local,fedavg-ft,best",
        help="comma-separated: local, fedavg, fedavg-ft, fedbias, fedper, best (chosen by --tune); sharing "
        "LoRA r 8: fedper-lora, fedsa, ffa",
    ),
    seeds: int = typer.Option(3, help="number of seeds (0..n-1)"),
    from_seed: int = typer.Option(0, help="skip the seeds below this one (another run has them)"),
    workers: int = typer.Option(2, help="worker processes (one thread each)"),
    tune: bool = typer.Option(
        False, help="choose values on validation splits (seed 0) at each --privacy budget → tuned.toml"
    ),
    run_dir: Path = typer.Option(None, help="folder of an earlier run to resume (finished cells are kept)"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
    report_only: bool = typer.Option(False, help="tabulate the cells finished in --run-dir, run nothing"),
    also: str = typer.Option(
        "", help="extra cells, privacy:mode[:seeds] items, e.g. user-eps2:best,none:best:1 (best = chosen)"
    ),
) -> None:
    """1,000 users × 24/12 examples, user-level DP: per-user accuracy (issue #31); head-only modes, and
    the LoRA-sharing ones (fedper-lora, fedsa, ffa) on request.

    Modes may name ``best``: the personal mode chosen on validation for each setting (``--tune``)."""
    from simulations.bench.commands import bench_cross_device

    progress, update = _grid_progress("cross-device cells")
    try:
        with progress:
            run, table = bench_cross_device(
                split_csv(settings), split_csv(privacy), split_csv(modes), list(range(from_seed, seeds)),
                workers, run_dir, update, tune=tune, publish=not no_publish, report_only=report_only,
                also=split_csv(also) if also else (),
            )  # fmt: skip
    except (FedpersError, ValueError) as exc:
        fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group to ``app``."""
    app.add_typer(bench_app, name="bench")
