"""The simulation-speed benchmark: the floor, the workloads, the interleaved schedule and the report.

The floor is checked against fedpers' own clients: on a non-private workload both train from the same
per-client seeds, so they end with the same shared tensors (up to float rounding from the order in which
the server sums the replies) and the same per-client accuracies. The same holds for user-level DP without
noise (z = 0) and without sampling (every client, ``dp.user-sampling = "none"``): clipping and the
uniform average over the fixed denominator are the same math.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY

from common.config import Config
from common.errors import ConfigError
from server import checkpoint
from simulations.bench.floor import check_floor_config, federate, run_floor, user_level_release
from simulations.bench.sim_speed import (
    WORKLOADS,
    choose_flower,
    ratios,
    run_runner,
    schedule,
    sim_speed_table,
    summarize,
    timings,
    workload_overrides,
)
from simulations.sequential import run_sequential

FEDAVG: dict[str, Any] = {**TINY, "dp.enabled": False, "personalization.mode": "fedavg"}
XDEV_TINY: dict[str, Any] = {
    "model.name": "tiny",
    "fed.fraction-train": 0.25,
}  # head-only: frozen-layers stays


def _same_as_sequential(tmp_path: Path, over: dict[str, Any], clients: int = 3) -> None:
    floor = federate(over, clients)
    summary = run_sequential(over, clients, tmp_path / "seq")
    final = checkpoint.load(tmp_path / "seq" / "checkpoint")
    assert final is not None and set(final.arrays) == set(floor.shared)
    for name, value in final.arrays.items():
        np.testing.assert_allclose(floor.shared[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    theirs = {row["client"]: row["acc"] for row in summary["clients"]}
    assert floor.accuracy == pytest.approx(theirs, abs=1e-9)


@pytest.mark.parametrize(
    "extra",
    [
        {"personalization.mode": "fedavg"},
        {"personalization.mode": "fedper"},
        {"personalization.mode": "fedper", "train.personal-epochs": 2},  # FedRep: head alone, then LoRA
    ],
)
def test_floor_trains_the_same_tensors_as_the_clients(tmp_path: Path, extra: dict[str, Any]) -> None:
    _same_as_sequential(tmp_path, {**FEDAVG, **extra})


def test_floor_user_level_release_equals_the_server_without_noise(tmp_path: Path) -> None:
    over = {
        **FEDAVG,
        "dp.user-level": True,
        "dp.user-sampling": "none",
        "dp.user-noise-multiplier": 0.0,
        "dp.user-clipping-norm": 0.01,  # small: every update is clipped
    }
    _same_as_sequential(tmp_path, over)


def test_user_level_release_clips_averages_over_m_and_adds_z_s_over_m_noise() -> None:
    cfg = Config.from_run_config({"dp.enabled": False, "dp.user-level": True, "dp.user-clipping-norm": 1.0})
    current = {"w": np.zeros(200_000, dtype=np.float32)}
    big = {"w": np.full(200_000, 3.0, dtype=np.float32)}  # norm far above S = 1: clipped to 1
    small = {"w": np.zeros(200_000, dtype=np.float32)}
    small["w"][0] = 0.5  # norm 0.5 < S: unchanged
    rng = np.random.default_rng(0)
    quiet = Config.from_run_config({**cfg.to_run_config(), "dp.user-noise-multiplier": 0.0})
    out = user_level_release(current, [big, small], 4.0, quiet, rng)["w"]
    assert np.linalg.norm(out[1:] * 4.0) == pytest.approx(1.0, rel=1e-4)  # the clipped update, over m = 4
    assert out[0] == pytest.approx((1.0 / np.sqrt(200_000) + 0.5) / 4.0, rel=1e-4)
    noisy = Config.from_run_config({**cfg.to_run_config(), "dp.user-noise-multiplier": 2.0})
    out = user_level_release(current, [], 4.0, noisy, rng)["w"]  # nobody drawn: noise only
    assert float(np.std(out)) == pytest.approx(2.0 * 1.0 / 4.0, rel=0.02)


def test_floor_runs_the_cross_device_workload_with_poisson_cohorts() -> None:
    over = {**workload_overrides("cross-device", 3), **XDEV_TINY}
    out = run_floor(over, 24)
    assert out["rounds"] == 3 and len(out["round-ends"]) == 3
    assert all(0 <= n <= 24 for n in out["cohorts"]) and sum(out["cohorts"]) > 0
    assert 0.0 <= out["acc-mean"] <= 1.0
    assert out["round-ends"] == sorted(out["round-ends"])


@pytest.mark.parametrize(
    "bad",
    [
        {"dp.enabled": True},
        {"dp.user-level": True, "dp.user-epsilon": 8.0},
        {"fed.fraction-evaluate": 0.5},
    ],
)
def test_floor_refuses_what_it_does_not_reproduce(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="the floor does not run"):
        check_floor_config(Config.from_run_config({**FEDAVG, **bad}))


def test_cross_device_workload_is_a_valid_config() -> None:
    over = workload_overrides("cross-device")
    cfg = Config.from_run_config(over)
    check_floor_config(cfg)
    assert cfg.lora.r == 0 and cfg.task.partitioner == "fixed-size" and cfg.task.dirichlet_alpha == 1.0
    assert (cfg.task.train_size, cfg.task.test_size) == (24, 12)
    assert cfg.fed.fraction_train == 0.05 and cfg.fed.evaluate_every == cfg.fed.num_rounds
    assert cfg.dp.user_level and not cfg.dp.enabled and cfg.dp.user_noise_multiplier == 0.744
    assert not cfg.client.report_before_after
    shorter = Config.from_run_config(workload_overrides("cross-device", 5))
    assert shorter.fed.num_rounds == shorter.fed.evaluate_every == 5
    assert Config.from_run_config(workload_overrides("classic")).fed.evaluate_every == 1
    with pytest.raises(ConfigError, match="unknown workload"):
        workload_overrides("cross-silo")
    assert set(WORKLOADS) == {"classic", "cross-device"}


def test_schedule_interleaves_the_runners_repeat_by_repeat() -> None:
    order = schedule(["floor", "flower", "pfl"], 3)
    assert [r for _, r in order] == ["floor", "flower", "pfl"] * 3
    assert [rep for rep, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ConfigError):
        schedule(["floor"], 0)
    with pytest.raises(ConfigError):
        schedule(["floor", "ray"], 3)
    with pytest.raises(ConfigError):
        schedule(["floor", "floor"], 3)


def test_timings_take_steady_rounds_between_the_first_and_the_last() -> None:
    row = timings("floor", 100.0, 102.0, [110.0, 111.0, 113.0, 114.0, 120.0], 121.0)
    assert row["round-seconds"] == [8.0, 1.0, 2.0, 1.0, 6.0]
    assert row["steady-round-seconds"] == 1.0  # median of 1, 2, 1: not the first, not the last
    assert row["last-round-seconds"] == 6.0
    assert row["cold-start-seconds"] == pytest.approx(110.0 - 100.0 - 1.0)
    assert row["imports-seconds"] == 2.0 and row["wall-seconds"] == 21.0
    two = timings("floor", 0.0, 1.0, [5.0, 7.0], 7.5)
    assert two["steady-round-seconds"] == 2.0  # two rounds: the last one


def _row(runner: str, wall: float, **kw: Any) -> dict[str, Any]:
    base = {"runner": runner, "wall-seconds": wall, "imports-seconds": 3.0, "cold-start-seconds": 5.0,
            "steady-round-seconds": wall / 10, "last-round-seconds": 2.0, "acc-mean": 0.5, "threads": 2,
            "actors": 1, "workers": 2}  # fmt: skip
    return {**base, **kw}


def test_summary_reports_median_min_max_and_ratios_of_medians() -> None:
    rows = [
        _row("floor", 10.0), _row("flower", 14.0), _row("pfl", 12.0),
        _row("floor", 30.0), _row("flower", 13.0), _row("pfl", 11.0),
        _row("floor", 11.0), _row("flower", 50.0), _row("pfl", 13.0),
    ]  # fmt: skip
    stats = summarize(rows)
    assert list(stats) == ["floor", "flower", "pfl"] and stats["floor"]["runs"] == 3
    assert stats["floor"]["wall-seconds"] == {"median": 11.0, "min": 10.0, "max": 30.0}
    assert stats["flower"]["wall-seconds"] == {"median": 14.0, "min": 13.0, "max": 50.0}
    r = ratios(stats)
    assert r["fedpers/floor wall"] == pytest.approx(14.0 / 11.0)
    assert r["fedpers/pfl wall"] == pytest.approx(14.0 / 12.0)
    assert r["fedpers/floor steady"] == pytest.approx(1.4 / 1.1)
    table = sim_speed_table(rows, 4, 0.001)
    assert "| (b) floor (bare compute, 1 process × 2 thread(s)) | 3 | 11.0 [10.0–30.0] |" in table
    assert "(c) pfl-research, 2 worker processes × 1 thread (torchrun)" in table
    assert "fedpers/floor (median wall) = **1.27** (target ≤ 1.25: MISSED)" in table
    assert "fedpers/pfl (median wall) = **1.17** (target ≤ 1: MISSED)" in table
    assert "Flower round-1 cold start (median) 5.0 s (target ≤ 8.0 s: met)" in table
    cross = sim_speed_table(rows, 4, 0.0, "cross-device")  # issue #31's targets: ≤ 1.5 × floor
    assert "fedpers/floor (median wall) = **1.27** (target ≤ 1.5: met)" in cross
    assert "cold start (median) 5.0 s (no target)" in cross


def test_probe_runs_choose_flower_and_stay_out_of_the_comparison() -> None:
    probes = [_row("flower", 20.0, actors=2, probe=True), _row("flower", 15.0, actors=1, probe=True)]
    assert choose_flower(probes) == 1
    failed = {"runner": "pfl", "run": "pfl-2", "error": "torchrun failed"}
    rows = [*probes, _row("floor", 10.0), _row("flower", 12.0), _row("pfl", 11.0), failed]
    stats = summarize([r for r in rows if not r.get("probe") and "error" not in r])
    assert stats["flower"]["runs"] == 1
    table = sim_speed_table(rows, 4, 0.0)
    assert "probe (one run each, not in the comparison): 2 actor(s) × 2 thread(s) 20.0 s" in table
    assert "→ 1 actor(s)" in table
    assert "fedpers/floor (median wall) = **1.20**" in table  # 12 / 10: the probes are not timed runs
    assert "failed runs (left out; their errors are in result.json): pfl-2" in table
    with pytest.raises(ConfigError):
        choose_flower([])


def test_unknown_runner_fails_with_the_child_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="unknown runner 'ray'"):
        run_runner("ray", 2, 1, 0, tmp_path, extra=TINY)


@pytest.mark.slow  # each runner in a fresh process (pfl with 2 workers under torchrun)
@pytest.mark.parametrize(("runner", "workers"), [("floor", 1), ("sequential", 1), ("pfl", 1), ("pfl", 2)])
def test_runner_reports_rounds_and_cold_start(tmp_path: Path, runner: str, workers: int) -> None:
    if runner == "pfl":
        pytest.importorskip("pfl")
    extra = {**TINY, "fed.num-rounds": 3}
    row = run_runner(runner, 3, 1, 0, tmp_path / runner, extra=extra, workers=workers)
    assert len(row["round-seconds"]) == 3 and row["wall-seconds"] >= sum(row["round-seconds"])
    assert 0.0 < row["imports-seconds"] < row["wall-seconds"] and 0.0 <= row["acc-mean"] <= 1.0
    assert row["cold-start-seconds"] > 0.0 and row["steady-round-seconds"] == row["round-seconds"][1]
    if runner == "pfl":
        assert row["workers"] == workers
