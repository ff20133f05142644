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
    workers: int, folder: Path | None = None, progress: Progress | None = None
) -> tuple[BenchRun, str]:
    """Choose learning rates on validation splits; writes simulations/configs/bench-tuned.toml."""
    from simulations.bench.grid import run_grid
    from simulations.bench.tune import choose, tune_cells, write_tuned

    run = _run("tune", folder)
    cells = tune_cells()
    done = run_grid(run.dir, cells, workers, on_progress=progress)
    chosen = choose(cells, done)
    write_tuned(chosen, cells, done, run.command)
    run.results = {"chosen": chosen, "cells": done}
    table = "\n".join(f"- {mode}: {values}" for mode, values in chosen.items()) + "\n"
    run.save(table)
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
) -> tuple[BenchRun, str]:
    """The mode × privacy × seed grid (resumable: pass the same folder to finish an interrupted run)."""
    from simulations.bench.grid import load_done, run_grid
    from simulations.bench.quality import aggregate, load_tuned, plan
    from simulations.bench.quality_report import quality_plot, quality_table

    run = _run("quality", folder)
    cells = plan(settings, privacies, modes, seeds, load_tuned())
    try:
        done = run_grid(run.dir, cells, workers, on_progress=progress)
    finally:  # also publish what finished when interrupted or a cell failed
        done = load_done(run.dir, cells)
        rows = aggregate(done)
        run.results = {"planned": [c.key for c in cells], "rows": rows, "tuned": load_tuned()}
        table = quality_table(rows, len(cells), len(done))
        run.save(table)
        if rows:
            quality_plot(rows, run.dir / "quality.png")
        if publish and rows:
            run.publish(table)
    return run, table


def bench_names() -> dict[str, str]:
    """Benchmark names and what they measure."""
    return {
        "quality": "per-client accuracy: modes × privacy × seeds on tweets α=0.3/1.0 and news",
        "tune": "choose learning rates on validation splits (feeds quality)",
        "dp-cost": "time per step and peak memory: non-private vs Opacus hooks/functorch/ghost",
        "comm": "bytes per client per round for every mode and LoRA rank",
        "sim-speed": "the same workload on Flower's simulation engine, a plain loop and pfl-research",
        "scale": "population 50 → 600, 20 clients per round: wall per round, peak RSS, state per user",
    }


def describe(results: dict[str, Any]) -> str:
    """One line per result key (for the CLI when a benchmark has no table)."""
    return "\n".join(f"{k}: {v}" for k, v in results.items())
