"""The ``fedpers bench <name>`` commands: run a benchmark, save its folder, publish to BENCHMARKS.md."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simulations.bench.output import BenchRun

Progress = Callable[[int, int], None]


def command_line() -> str:
    """The command as the user typed it (for result.json and BENCHMARKS.md)."""
    args = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else ["fedpers"]
    return " ".join(shlex.quote(a) for a in args)


def _run(name: str, folder: Path | None) -> BenchRun:
    return BenchRun(name, command_line(), folder=folder)


def bench_comm(folder: Path | None = None, publish: bool = True) -> tuple[BenchRun, str]:
    """Bytes per client per round for every mode and LoRA rank 4/8/16."""
    from simulations.bench.comm import comm_table, run_comm

    run = _run("comm", folder)
    rows = run_comm({})
    run.results = {"rows": rows}
    table = comm_table(rows)
    run.save(table)
    if publish:
        run.publish(table)
    return run, table


def bench_tune(
    workers: int,
    folder: Path | None = None,
    progress: Progress | None = None,
    modes: Sequence[str] = ("fedper", "local"),
    server_lrs: Sequence[float] = (1.0,),
    write: bool = True,
) -> tuple[BenchRun, str]:
    """Choose learning rates on validation splits; writes simulations/configs/bench-tuned.toml.

    With ``write=False`` the choice and every candidate's score go only to the run folder (an
    exploration that must not change the settings the quality grid's finished cells ran with).
    """
    from simulations.bench.grid import run_grid
    from simulations.bench.quality import TUNED
    from simulations.bench.tune import choose, tune_cells, write_tuned

    run = _run("tune", folder)
    cells = tune_cells(modes, server_lrs=server_lrs)
    done = run_grid(run.dir, cells, workers, on_progress=progress)
    chosen = choose(cells, done)
    write_tuned(chosen, cells, done, run.command, TUNED if write else run.dir / "tuned.toml")
    run.results = {"chosen": chosen, "cells": done}
    table = "\n".join(f"- {mode}: {values}" for mode, values in chosen.items()) + "\n"
    run.save(table)
    return run, table


def bench_lm_tune(
    candidates: Sequence[str],
    modes: Sequence[str],
    workers: int,
    folder: Path | None = None,
    progress: Progress | None = None,
    write: bool = True,
    report_only: bool = False,
) -> tuple[BenchRun, str]:
    """Tune the generative assistant per mode on validation splits → shakespeare-tuned.toml.

    ``report_only`` tabulates (and writes the choice from) the cells finished so far, running none.
    """
    from simulations.bench.grid import load_done, run_grid
    from simulations.bench.lm_tune import CANDIDATES, choose, lm_tune_cells, lm_tune_table, write_tuned_lm

    run = _run("lm-tune", folder)
    cells = lm_tune_cells(candidates, modes)
    try:
        if not report_only:
            run_grid(run.dir, cells, workers, on_progress=progress)
    finally:  # keep what finished when interrupted; report and choose from every cell finished here
        cells = lm_tune_cells(list(CANDIDATES))  # every mode: a run of some modes keeps the others' rows
        done = load_done(run.dir, cells)
        chosen = choose(cells, done)
        run.results = {"chosen": chosen, "cells": done}
        table = lm_tune_table(cells, done)
        run.save(table)
        if write and chosen:
            write_tuned_lm(chosen, cells, done, run.command)
    return run, table


def bench_quality(
    settings: Sequence[str],
    privacies: Sequence[str],
    modes: Sequence[str],
    seeds: Sequence[int],
    workers: int,
    folder: Path | None = None,
    progress: Progress | None = None,
    publish: bool = True,
    report_only: bool = False,
) -> tuple[BenchRun, str]:
    """The mode × privacy × seed grid (resumable: pass the same folder to finish an interrupted run).

    ``report_only`` tabulates and publishes the cells finished so far without running any.
    """
    from simulations.bench.grid import load_done, run_grid
    from simulations.bench.quality import aggregate, ledger_check, load_tuned, plan
    from simulations.bench.quality_report import quality_plot, quality_table

    run = _run("quality", folder)
    cells = plan(settings, privacies, modes, seeds, load_tuned())
    try:
        if not report_only:
            run_grid(run.dir, cells, workers, on_progress=progress)
    finally:  # also publish what finished when interrupted or a cell failed
        done = load_done(run.dir, cells)
        rows = aggregate(done)
        run.results = {"planned": [c.key for c in cells], "rows": rows, "tuned": load_tuned()}
        table = quality_table(rows, len(cells), done, ledger_check(run.dir, done))
        run.save(table)
        if rows:
            quality_plot(rows, run.dir / "quality.png")
        if publish and rows:
            run.publish(table)
    return run, table


def bench_dp_cost(
    batches: Sequence[int],
    repeats: int,
    threads: int,
    folder: Path | None = None,
    publish: bool = True,
    device: str = "cpu",
) -> tuple[BenchRun, str]:
    """Time per step and peak memory, non-private vs Opacus hooks/functorch/ghost, on the CPU or a GPU."""
    from common.config import Config
    from common.device import describe, resolve_device
    from simulations.bench import dp_cost as dpc

    dev = resolve_device(device)
    run = _run("dp-cost", folder)
    times = dpc.time_variants(dpc.VARIANTS, batches, repeats, threads, device=str(dev))
    if dev.type == "cuda":
        mems = dpc.cuda_memory(dpc.VARIANTS, batches, threads, device=str(dev))
    elif dev.type == "cpu":
        mems = dpc.measure_memory(dpc.VARIANTS, batches, threads)
    else:
        mems = []  # no peak-memory reading for this device type: times only
    rows = dpc.merge(times, mems)
    default = Config.from_run_config({}).dp.grad_sample_mode
    where = describe(dev)
    run.results = {"rows": rows, "threads": threads, "repeats": repeats, "default-mode": default}
    run.results["device"] = where
    table = f"One epoch of 512 tweets, MiniLM LoRA r=8 (top 2 layers) + head, on {where}.\n\n"
    table += dpc.dp_cost_table(rows, default, "CUDA" if dev.type == "cuda" else "RSS")
    run.save(table)
    if publish and dev.type != "cpu":
        print("not published: BENCHMARKS.md's dp-cost table is the reference CPU's (see the run folder)")
    elif publish:
        run.publish(table)
    return run, table


def bench_scale(
    populations: Sequence[int], cohort: int, folder: Path | None = None, publish: bool = True
) -> tuple[BenchRun, str]:
    """Population sweep with a fixed cohort: wall per round, peak RSS, state per user."""
    from simulations.bench.scale import WORKLOAD, run_population, scale_table

    run = _run("scale", folder)
    rows = []
    for n in populations:
        rows.append(run_population(n, cohort, run.dir / f"pop-{n}"))
        run.results = {"rows": rows, "workload": WORKLOAD, "cohort": cohort}
        run.save(scale_table(rows))  # keep what finished if a larger population fails
    table = (
        f"Workload: tweets (Dirichlet α={WORKLOAD['task.dirichlet-alpha']}) over the population, "
        f"{WORKLOAD['task.train-size']} train / "
        f"{WORKLOAD['task.test-size']} test per user, fedper with DP ε=8, "
        f"{WORKLOAD['fed.num-rounds']} rounds, {cohort} users sampled per round for training and "
        "evaluation, Flower simulation with 2 single-thread actors.\n\n" + scale_table(rows)
    )
    run.save(table)
    if publish:
        run.publish(table)
    return run, table


def bench_names() -> dict[str, str]:
    """Benchmark names and what they measure."""
    return {
        "quality": "per-client accuracy: modes × privacy × seeds on tweets α=0.3/1.0 and news",
        "tune": "choose learning rates on validation splits (feeds quality)",
        "lm-tune": "tune the generative assistant per mode on validation splits (feeds shakespeare.toml)",
        "dp-cost": "time per step and peak memory: non-private vs Opacus hooks/functorch/ghost",
        "comm": "bytes per client per round for every mode and LoRA rank",
        "sim-speed": "one workload (classic or cross-device) on Flower, as bare compute and on pfl-research",
        "cross-device": "1,000 users, user-level DP: best personal mode vs local and fedavg-ft, 3 seeds",
        "scale": "population 50 → 600, 20 clients per round: wall per round, peak RSS, state per user",
    }


def describe(results: dict[str, Any]) -> str:
    """One line per result key (for the CLI when a benchmark has no table)."""
    return "\n".join(f"{k}: {v}" for k, v in results.items())


def bench_cross_device(
    settings: Sequence[str],
    privacies: Sequence[str],
    modes: Sequence[str],
    seeds: Sequence[int],
    workers: int,
    folder: Path | None = None,
    progress: Progress | None = None,
    tune: bool = False,
    publish: bool = True,
    report_only: bool = False,
    also: Sequence[str] = (),
) -> tuple[BenchRun, str]:
    """The cross-device grid (issue #31), resumable; ``tune``: choose values on validation splits instead,
    at each user-level budget of ``privacies``.

    ``also``: extra ``privacy:mode[:seeds]`` cells (cross_device.parse_also).

    Finished cells go to ``results/cross-device/summary.json`` (records of other runs' cells are kept) and
    the table to BENCHMARKS.md; a tuning run writes ``results/cross-device/tuned.toml``.
    """
    import json

    from common.fileio import write_json_atomic
    from simulations.bench import cross_device as X
    from simulations.bench.grid import load_done, run_grid

    if tune:  # the cells first: a wrong option leaves no run folder behind
        wanted = [*modes, *(X.PERSONAL if "best" in modes else ())]  # best: every personal mode competes
        cells = X.tune_cells(settings, list(dict.fromkeys(m for m in wanted if m in X.CANDIDATES)), privacies)
    else:
        cells = X.plan(settings, privacies, modes, seeds, X.load_tuned(), X.parse_also(also))
    run = _run("cross-device-tune" if tune else "cross-device", folder)
    try:
        if not report_only:
            run_grid(run.dir, cells, workers, on_progress=progress)
    finally:  # keep and report what finished when interrupted or a cell failed
        done = load_done(run.dir, cells)
        if tune:
            chosen = X.choose(cells, done)
            table = X.tune_table(cells, done)
            run.results = {"chosen": chosen, "cells": done}
            run.save(table)
            if chosen:
                X.write_tuned(chosen, run.command)
        else:
            mine = X.records(done)
            ids = {(r["setting"], r["privacy"]["budget"], r["mode"], r["seed"]) for r in mine}
            kept = json.loads(X.SUMMARY.read_text())["records"] if X.SUMMARY.is_file() else []
            others = [
                r for r in kept if (r["setting"], r["privacy"]["budget"], r["mode"], r["seed"]) not in ids
            ]
            for r in others:  # records written before the within-user ε was kept
                r["privacy"].setdefault("within_user_epsilon", X.within_user_epsilon(r))
            recs = sorted(
                others + mine,
                key=lambda r: (
                    list(X.SETTINGS).index(r["setting"]),
                    r["privacy"]["budget"],
                    r["mode"],
                    r["seed"],
                ),
            )
            if publish or not report_only:  # a look at a run (--report-only --no-publish) changes nothing
                write_json_atomic(X.SUMMARY, {"command": run.command, "records": recs})
            table = X.table(recs) + "\nTargets (issue #31):\n\n" + X.targets(recs)
            run.results = {"planned": [c.key for c in cells], "cells": done}
            run.save(table)
            if publish and recs:
                run.publish(table)
    return run, table
