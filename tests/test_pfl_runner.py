"""The pfl-research runner of the speed benchmark runs the fedavg workload end to end (needs pfl)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TINY

pytest.importorskip("pfl")

OVERRIDES: dict[str, Any] = {
    **TINY,
    "task.train-size": 40,
    "task.test-size": 20,
    "fed.num-rounds": 2,
    "dp.enabled": False,
    "personalization.mode": "fedavg",
}


@pytest.fixture
def _keep_start_method() -> Iterator[None]:
    """Importing pfl's PyTorch support sets the multiprocessing start method; later tests get it back."""
    before = multiprocessing.get_start_method(allow_none=True)
    yield
    multiprocessing.set_start_method(before, force=True)


@pytest.mark.usefixtures("_keep_start_method")
def test_pfl_runner_trains_every_round_and_reports_timings() -> None:
    from simulations.bench.pfl_runner import run_pfl

    out = run_pfl(OVERRIDES, 3)
    expected = {"seconds", "cold-start-seconds", "round-seconds", "round-ends", "acc-mean", "framework"}
    assert expected <= set(out)
    assert out["framework"].startswith("pfl ")
    assert out["rounds"] == 2 and len(out["round-seconds"]) == 2
    assert all(s > 0 for s in out["round-seconds"])
    assert 0 < out["cold-start-seconds"] <= out["seconds"]
    assert 0.0 <= out["acc-mean"] <= 1.0
    assert out["workers"] == 1 and out["cohort"] == 3 and len(out["acc-per-evaluation"]) == 2


@pytest.mark.usefixtures("_keep_start_method")
def test_pfl_runner_runs_the_cross_device_workload_with_central_user_level_dp() -> None:
    from simulations.bench.pfl_runner import run_pfl
    from simulations.bench.sim_speed import workload_overrides

    over = {**workload_overrides("cross-device", 2), "model.name": "tiny", "fed.fraction-train": 0.25}
    out = run_pfl(over, 16)
    assert out["cohort"] == 4 and out["rounds"] == 2 and out["workers"] == 1
    assert len(out["acc-per-evaluation"]) == 1  # evaluated after the last round only
    assert 0.0 <= out["acc-mean"] <= 1.0 and len(out["round-ends"]) == 2


@pytest.mark.usefixtures("_keep_start_method")
@pytest.mark.parametrize(
    "bad",
    [
        {"dp.enabled": True},
        {"personalization.mode": "fedper"},
        {"dp.user-level": True, "dp.user-epsilon": 8.0},
        {"dp.user-level": True, "dp.user-virtual-cohort": 50, "dp.user-virtual-population": 1000},
    ],
)
def test_pfl_runner_refuses_what_it_does_not_reproduce(bad: dict[str, Any]) -> None:
    from common.config import Config
    from common.errors import ConfigError
    from simulations.bench.pfl_runner import check_pfl_config

    with pytest.raises(ConfigError):
        check_pfl_config(Config.from_run_config({**OVERRIDES, **bad}), 3)
