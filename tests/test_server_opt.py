"""The server optimizer (FedAvgM): FedAvg by default, steps by hand, bad values, checkpointed velocity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import Config
from common.errors import ConfigError
from server import checkpoint
from server.server_opt import ServerOptimizer


def _tensors(*values: float) -> dict[str, np.ndarray]:
    return {"a": np.array(values, dtype=np.float32), "b": np.full((2, 2), values[0], dtype=np.float32)}


def test_default_is_fedavg_and_adopts_the_aggregate_bit_for_bit() -> None:
    opt = ServerOptimizer()
    x, avg = _tensors(1.0, 2.0), _tensors(1.3, 1.7)
    out = opt.step(x, avg)
    assert opt.is_fedavg and not opt.velocity
    for k in avg:
        np.testing.assert_array_equal(out[k], avg[k])


def test_server_lr_and_momentum_steps_by_hand() -> None:
    opt = ServerOptimizer(lr=2.0, momentum=0.5)
    x0 = _tensors(1.0, 2.0)
    x1 = opt.step(x0, _tensors(1.5, 1.0))  # d = (0.5, -1.0); v = d; x = x0 + 2 v
    np.testing.assert_allclose(x1["a"], [2.0, 0.0])
    x2 = opt.step(x1, _tensors(2.0, 1.0))  # d = (0, 1); v = 0.5 (0.5, -1) + (0, 1) = (0.25, 0.5)
    np.testing.assert_allclose(opt.velocity["a"], [0.25, 0.5])
    np.testing.assert_allclose(x2["a"], [2.5, 1.0])
    assert all(v.dtype == np.float32 for v in x2.values())


@pytest.mark.parametrize(
    ("lr", "momentum", "match"),
    [
        (0.0, 0.0, "server-lr"),
        (-1.0, 0.0, "server-lr"),
        (float("nan"), 0.0, "server-lr"),
        (1.0, 1.0, "server-momentum"),
        (1.0, -0.1, "server-momentum"),
    ],
)
def test_bad_values_fail_clearly(lr: float, momentum: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerOptimizer(lr, momentum)


def test_config_range_checks_and_defaults() -> None:
    cfg = Config.from_run_config({})
    assert ServerOptimizer.from_config(cfg).is_fedavg
    with pytest.raises(ConfigError, match="fed.server-momentum"):
        Config.from_run_config({"fed.server-momentum": 1.5})
    with pytest.raises(ConfigError, match="fed.server-lr"):
        Config.from_run_config({"fed.server-lr": 0.0})


def test_mismatched_names_are_refused() -> None:
    opt = ServerOptimizer(lr=2.0)
    with pytest.raises(ValueError, match="aggregate names"):
        opt.step(_tensors(1.0), {"a": np.zeros(1, np.float32)})
    opt.step(_tensors(1.0), _tensors(2.0))
    with pytest.raises(ConfigError, match="velocity"):
        opt.step({"c": np.zeros(1, np.float32)}, {"c": np.ones(1, np.float32)})


def test_velocity_survives_a_checkpoint_and_the_resumed_trajectory_is_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    aggregates = [{"a": rng.normal(size=3).astype(np.float32)} for _ in range(3)]
    straight, x = ServerOptimizer(1.5, 0.9), {"a": np.zeros(3, np.float32)}
    for agg in aggregates:
        x = straight.step(x, agg)
    first, y = ServerOptimizer(1.5, 0.9), {"a": np.zeros(3, np.float32)}
    for agg in aggregates[:2]:
        y = first.step(y, agg)
    checkpoint.save(tmp_path, checkpoint.Checkpoint(2, y, {}, first.velocity))
    ckpt = checkpoint.load(tmp_path)
    assert ckpt is not None and set(ckpt.velocity) == {"a"}
    resumed = ServerOptimizer(1.5, 0.9, ckpt.velocity)
    z = resumed.step(ckpt.arrays, aggregates[2])
    np.testing.assert_allclose(z["a"], x["a"], rtol=1e-6)


def test_a_checkpoint_without_velocity_loads_with_none(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, {"a": np.ones(2, np.float32)}, {}))
    ckpt = checkpoint.load(tmp_path)
    assert ckpt is not None and ckpt.velocity == {}
