"""The plain loop as a function: one federation in this process, its summary with per-client rows.

A thin wrapper over ``simulations.local_grid.run_local`` (the ServerApp's own federation over an
in-process Grid of real ClientApps). Uses: the floor for the simulation-speed benchmark, the benchmark
grid's cells, and quick runs without Ray start-up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common import protocol as P
from common.config import Config
from server import recorder
from simulations.local_grid import run_local


def run_sequential(
    overrides: Mapping[str, Any],
    num_clients: int,
    out: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    limits: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``fed.num-rounds`` rounds over ``num_clients`` into ``out``; returns the run's summary.

    The summary is the run's ``summary.json`` with ``clients`` (a row per client: ``client``, ``acc``,
    and ``majority`` / ``ppl`` where measured) and ``rounds`` (the lines of ``metrics.jsonl``, as
    ``on_round`` receives them) in place of their counts, and ``seconds`` the wall time. Clients are
    evaluated every ``fed.evaluate-every`` rounds and always after the last one. ``limits``: the simulated
    devices' own privacy limits (``[simulation]`` max-epsilon, delta, allow-no-dp).
    """
    over = {**overrides, "output.run-dir": str(out)}
    if Config.from_run_config(over).fed.min_clients > num_clients:
        over["fed.min-clients"] = num_clients
    start = time.perf_counter()
    if on_round:
        recorder.ROUND_LISTENERS.append(on_round)
    try:
        run_dir = run_local(over, num_clients, limits)
    finally:
        if on_round:
            recorder.ROUND_LISTENERS.remove(on_round)
    return summary_of(run_dir, time.perf_counter() - start)


def summary_of(run_dir: Path, seconds: float) -> dict[str, Any]:
    """``summary.json`` of a finished run with its client rows and round lines (see run_sequential)."""
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    state = json.loads((run_dir / "recorder-state.json").read_text())
    rows = sorted(state["clients"].values(), key=lambda r: int(r["client"]))
    summary["clients"] = [_client_row(r) for r in rows if r.get(P.EVAL_ACC) is not None]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    summary["rounds"] = [json.loads(line) for line in lines if line.strip()]
    summary["seconds"] = seconds
    summary.setdefault("epsilon-max", 0.0)  # no client spent any budget (dp.enabled = false)
    return summary


def _client_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One client's final scores: test accuracy, own-majority accuracy, perplexity (a causal LM)."""
    out = {"client": int(row["client"]), "acc": float(row[P.EVAL_ACC])}
    if row.get(P.MAJORITY_ACC) is not None:
        out["majority"] = float(row[P.MAJORITY_ACC])
    if row.get(P.PERPLEXITY) is not None:
        out["ppl"] = float(row[P.PERPLEXITY])
    if row.get(P.ENTITY_F1) is not None:
        out["f1"] = float(row[P.ENTITY_F1])
    return out
