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
    expected = {"seconds", "cold-start-seconds", "round-seconds", "acc-mean", "framework"}
    assert expected <= set(out)
    assert out["framework"].startswith("pfl ")
    assert out["rounds"] == 2 and len(out["round-seconds"]) == 2
    assert all(s > 0 for s in out["round-seconds"])
    assert 0 < out["cold-start-seconds"] <= out["seconds"]
    assert 0.0 <= out["acc-mean"] <= 1.0
