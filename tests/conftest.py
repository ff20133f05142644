"""Shared fixtures: the tiny configuration, an in-process Flower Grid, and the two Ray simulations.

The simulations are session-scoped and shared by test_simulation.py (a fresh 2-round run) and
test_checkpoint.py (the same run folder resumed for a 3rd round), so the whole suite starts Ray twice.
A test that uses them is in the slow tier (``make test-all``), as is anything marked ``slow``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client.state import KEY_ENV
from simulations.local_grid import LocalGrid as ProductGrid

RAY_FIXTURES = {"sim_fresh", "sim_resumed"}  # about a minute of Ray simulations together


@pytest.hookimpl(tryfirst=True)  # before ``-m "not slow"`` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a Ray simulation fixture ``slow``."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny model is far faster on one thread (no sync cost, no fight with other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _backbones_back_on_the_cpu() -> Iterator[None]:
    """Every test starts with the per-process backbones on the CPU.

    On a GPU box a node (``device = "auto"``) places the shared backbone on CUDA; a later test that builds
    models by hand on the CPU must not inherit that. A no-op where there is no GPU.
    """
    yield
    if torch.cuda.is_available():
        from common import backbone as common_backbone
        from common.device import place

        for backbone in list(common_backbone._CACHE.values()):
            place(backbone, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests use key files unless they set the state key themselves."""
    monkeypatch.delenv(KEY_ENV, raising=False)


TINY: dict[str, Any] = {
    "model.name": "tiny",
    "model.frozen-layers": 1,
    "task.train-size": 60,
    "task.test-size": 30,
    "train.batch-size": 20,
    "fed.num-rounds": 2,
}

# Single-client training tests (DP, privacy accounting, state): 3 DP steps per round.
TINY_TRAIN: dict[str, Any] = {
    "model.name": "tiny",
    "model.frozen-layers": 1,
    "task.train-size": 60,
    "task.test-size": 20,
    "train.batch-size": 20,
    "fed.num-rounds": 3,
}

# The simulations: 3 label-skewed clients; a fixed σ so that a resumed 3rd round still fits the budget
# (σ calibrated to the budget would leave nothing for a resumed round). ε after 2 / 3 rounds ≈ 10.9 / 13.0
# at the default δ = min(1e-5, 0.1/n).
SIM_CLIENTS = 3
SIM_OVERRIDES: dict[str, Any] = {
    **TINY,
    "task.dirichlet-alpha": 0.3,
    "dp.noise-multiplier": 0.7,
    "dp.epsilon": 14.0,
}


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower needs a task identity to create instruction messages outside a running app."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


class LocalGrid(ProductGrid):
    """The product's in-process grid, which can also drop messages and keeps every reply."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_id: int = 7,
        drop: Callable[[Message], bool] | None = None,
    ) -> None:
        super().__init__(client_app, num_nodes, run_id)
        self.replies: list[Message] = []
        self.drop = drop  # a message it returns True for gets no reply (the node went away)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        kept = [m for m in messages if self.drop is None or not self.drop(m)]
        out = list(super().send_and_receive(kept, timeout=timeout))
        self.replies += out
        return out


def describe(msg: Message) -> dict[str, Any]:
    """What a message carried: its node, error, and the tensor names of every ArrayRecord."""
    if msg.has_error():
        return {"node": msg.metadata.src_node_id, "error": msg.error.reason, "arrays": {}}
    return {
        "node": msg.metadata.src_node_id,
        "error": None,
        "arrays": {name: sorted(rec.keys()) for name, rec in msg.content.array_records.items()},
        "metrics": {name: dict(rec) for name, rec in msg.content.metric_records.items()},
    }


@dataclass
class SimRun:
    """A finished simulation and what the test hooks saw of its real messages."""

    run_dir: Path
    summary: dict[str, Any]
    train_replies: list[dict[str, Any]] = field(default_factory=list)
    eval_replies: list[dict[str, Any]] = field(default_factory=list)
    train_instructions: list[dict[str, list[str]]] = field(default_factory=list)
    first_arrays: dict[str, np.ndarray] | None = None
    snapshot: Path | None = None  # a copy of the run folder right after this run (the folder is reused)


def _simulate(run_dir: Path, overrides: dict[str, Any], label: str) -> SimRun:
    """Run ``simulate`` with spies on the strategy that record the real messages, then call through."""
    from common.params import from_record
    from server.strategy import FedpersStrategy
    from simulations.run import SimSettings, simulate

    seen = SimRun(run_dir, {})
    orig_train, orig_eval = FedpersStrategy.aggregate_train, FedpersStrategy.aggregate_evaluate
    orig_configure = FedpersStrategy.configure_train

    def aggregate_train(self: FedpersStrategy, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        seen.train_replies += [describe(m) for m in replies]
        return orig_train(self, server_round, replies)

    def aggregate_evaluate(self: FedpersStrategy, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        seen.eval_replies += [describe(m) for m in replies]
        return orig_eval(self, server_round, replies)

    def configure_train(self: FedpersStrategy, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        if seen.first_arrays is None:
            seen.first_arrays = from_record(arrays)
        messages = list(orig_configure(self, server_round, arrays, config, grid))
        seen.train_instructions += [
            {n: sorted(r.keys()) for n, r in m.content.array_records.items()} for m in messages
        ]
        return messages

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEDPERS_STATE_KEY", raising=False)
        mp.setattr(FedpersStrategy, "aggregate_train", aggregate_train)
        mp.setattr(FedpersStrategy, "aggregate_evaluate", aggregate_evaluate)
        mp.setattr(FedpersStrategy, "configure_train", configure_train)
        settings = SimSettings(num_clients=SIM_CLIENTS, client_cpus=1.0, overrides=overrides)
        seen.summary = simulate(settings, run_dir)
    seen.snapshot = Path(shutil.copytree(run_dir, run_dir.parent / f"after-{label}"))
    return seen


@pytest.fixture(scope="session")
def sim_fresh(tmp_path_factory: pytest.TempPathFactory) -> SimRun:
    """A fresh 2-round simulation (Ray)."""
    return _simulate(tmp_path_factory.mktemp("sim") / "run", dict(SIM_OVERRIDES), "fresh")


@pytest.fixture(scope="session")
def sim_resumed(sim_fresh: SimRun) -> SimRun:
    """The fresh run's folder resumed with fed.num-rounds = 3 (Ray)."""
    overrides = {**SIM_OVERRIDES, "fed.num-rounds": 3, "output.resume": True}
    return _simulate(sim_fresh.run_dir, overrides, "resumed")
