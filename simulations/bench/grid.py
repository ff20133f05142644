"""A resumable grid of sequential federated runs, executed by worker processes.

Each cell is one complete federation (``simulations.sequential.run_sequential``) whose summary is saved
as ``cells/<key>.json`` the moment it finishes; a rerun with the same folder skips finished cells, so an
interrupted grid loses at most the cells in flight. Cells that share data (same setting and seed) go to
the same task so a worker encodes each client's features once (the per-process feature cache), unless
there are fewer groups than workers: then the largest groups are halved so that no worker idles.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.fileio import write_bytes_atomic, write_json_atomic


@dataclass(frozen=True)
class Cell:
    """One federation of the grid: a key (also its file name) and its run-config overrides."""

    key: str
    overrides: dict[str, Any] = field(hash=False)
    num_clients: int = 20
    group: str = ""


def cell_path(root: Path, cell: Cell) -> Path:
    """Where a finished cell's summary lives."""
    return root / "cells" / f"{cell.key}.json"


def read_ledger(root: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The ledger a finished cell kept (``None`` when it has none), from ``root``."""
    rel = summary.get("ledger")
    if not rel:
        return None
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    if not path.is_file():
        return None
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def load_done(root: Path, cells: Sequence[Cell]) -> dict[str, dict[str, Any]]:
    """Summaries of the cells already finished under ``root``."""
    done = {}
    for cell in cells:
        path = cell_path(root, cell)
        if path.is_file():
            done[cell.key] = json.loads(path.read_text())
    return done


def run_cells(root: Path, cells: Sequence[Cell]) -> list[str]:
    """Run ``cells`` one after the other in this process (a worker's task); returns the keys done."""
    from simulations.sequential import run_sequential

    keys = []
    for cell in cells:
        path = cell_path(root, cell)
        if path.is_file():
            continue
        work = root / "work" / cell.key
        # An unfinished cell starts over: clients' state from an interrupted attempt would carry its spent
        # privacy budget into this one.
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        summary = run_sequential(cell.overrides, cell.num_clients, work)
        summary.update(
            {"key": cell.key, "overrides": cell.overrides, "wall-seconds": time.perf_counter() - t0}
        )
        ledger = work / "ledger.json"
        if ledger.is_file():  # kept next to the summary (the work folder is scratch, never committed)
            kept = path.with_name(path.stem + ".ledger.json.gz")
            write_bytes_atomic(kept, gzip.compress(ledger.read_bytes(), mtime=0))
            summary["ledger"] = str(kept.relative_to(root))
        write_json_atomic(path, summary)
        keys.append(cell.key)
    return keys


def split_for_workers(groups: list[list[Cell]], workers: int) -> list[list[Cell]]:
    """Worker tasks from groups of cells: halve the largest group until every worker has a task.

    Keeping a group together saves encoding its clients' features again, but a worker with no task is
    worse: the last groups of a grid (one setting × privacy × seed left) would run on one core only.
    """
    tasks = [list(g) for g in groups if g]
    while len(tasks) < workers:
        big = max(range(len(tasks)), key=lambda i: len(tasks[i]), default=None)
        if big is None or len(tasks[big]) < 2:
            break
        group = tasks.pop(big)
        half = (len(group) + 1) // 2
        tasks[big:big] = [group[:half], group[half:]]  # the grid's priority order is kept
    return tasks


def run_grid(
    root: Path,
    cells: Sequence[Cell],
    workers: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the unfinished ``cells`` on ``workers`` processes, grouped by ``Cell.group``, in order."""
    todo = [c for c in cells if not cell_path(root, c).is_file()]
    groups: dict[str, list[Cell]] = {}
    for cell in todo:
        groups.setdefault(cell.group or cell.key, []).append(cell)
    tasks = split_for_workers(list(groups.values()), workers)
    total = len(cells)
    if on_progress:
        on_progress(total - len(todo), total)
    if todo and workers <= 1:
        for group in tasks:
            run_cells(root, group)
            if on_progress:
                on_progress(len(load_done(root, cells)), total)
    elif todo:
        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch threads or locks
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending = {pool.submit(run_cells, root, g) for g in tasks}
            while pending:
                finished, pending = wait(pending, timeout=10.0, return_when=FIRST_COMPLETED)
                for fut in finished:
                    fut.result()  # re-raise a worker's error here
                if on_progress:
                    on_progress(len(load_done(root, cells)), total)
    return load_done(root, cells)
