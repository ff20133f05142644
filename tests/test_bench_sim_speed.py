"""The simulation-speed runners run the same tiny workload in fresh processes and report timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.bench.sim_speed import run_runner, sim_speed_table

TINY = {
    "model.name": "tiny",
    "model.frozen-layers": 1,
    "task.train-size": 30,
    "task.test-size": 10,
    "fed.num-rounds": 2,
}


@pytest.mark.slow  # each runner in a fresh process
@pytest.mark.parametrize("runner", ["sequential", "pfl"])
def test_runner_reports_rounds_and_cold_start(tmp_path: Path, runner: str) -> None:
    if runner == "pfl":
        pytest.importorskip("pfl")
    row = run_runner(runner, 2, 1, 0, tmp_path / runner, extra=TINY)
    assert len(row["round-seconds"]) == 2 and row["wall-seconds"] >= sum(row["round-seconds"])
    assert 0.0 < row["imports-seconds"] < row["wall-seconds"] and 0.0 <= row["acc-mean"] <= 1.0
    assert row["cold-start-seconds"] > 0.0


def test_unknown_runner_fails_with_the_child_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="unknown runner 'ray'"):
        run_runner("ray", 2, 1, 0, tmp_path, extra=TINY)


def test_table_states_ratios_and_targets() -> None:
    def row(runner: str, wall: float, **kw: float) -> dict:
        base = {"runner": runner, "wall-seconds": wall, "imports-seconds": 3.0, "cold-start-seconds": 5.0,
                "steady-round-seconds": 1.0, "acc-mean": 0.5, "threads": 2, "actors": 2}  # fmt: skip
        return {**base, **kw}

    rows = [row("sequential", 10.0), row("flower", 14.0, **{"cold-start-seconds": 9.0}), row("pfl", 12.0)]
    table = sim_speed_table(rows, 4, 0.001)
    assert "a/b (best Flower config / floor) = **1.40** (target ≤ 1.25: MISSED)" in table
    assert "a/c (Flower / pfl-research) = **1.17** (target ≤ 1: MISSED)" in table
    assert "cold start 9.0 s (target ≤ 8.0 s: MISSED)" in table
    warm = row("flower", 12.0, **{"cold-start-seconds": 4.0, "feature-cache": "read"})
    table = sim_speed_table([*rows, warm], 4, 0.001)
    assert "a/b (best Flower config / floor) = **1.40**" in table  # the ratios compare runs without a cache
    assert "2 actor(s), feature cache read | 12.0" in table
    assert "Flower cold start 4.0 s (target ≤ 8.0 s: met), wall 12.0 s (a/c 1.00;" in table
