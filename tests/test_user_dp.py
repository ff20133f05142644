"""User-level DP on the server: clipping bound, noise with the stated σ, adaptive clipping, accounting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_server import Model, client_metrics, make_strategy, reply
from test_server import model as model  # noqa: F401 (the fixture)

from common.privacy import compose, epsilon
from server.ledger import Ledger
from server.user_dp import UserLevelDP

SHAPES = {"a": (200, 50), "b": (100,)}


def _zeros() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def test_noise_has_the_stated_standard_deviation() -> None:
    dp = UserLevelDP(noise_multiplier=1.3, clipping_norm=0.5, rng=np.random.default_rng(7))
    current = _zeros()
    new, info = dp.release(current, [_zeros() for _ in range(8)], cohort=10, population=100)
    noise = np.concatenate([(new[k] - current[k]).ravel() for k in SHAPES])
    expected = 1.3 * 0.5 / 10  # z·S on the sum of clipped updates, divided by the cohort
    assert info["user-noise-std"] == pytest.approx(expected)
    assert noise.std() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size)


def test_one_user_moves_the_release_by_at_most_the_clipping_norm() -> None:
    dp = UserLevelDP(noise_multiplier=0.0, clipping_norm=0.5, rng=np.random.default_rng(0))
    huge = {k: np.full(s, 1e6, dtype=np.float32) for k, s in SHAPES.items()}
    new, info = dp.release(_zeros(), [huge, _zeros(), _zeros()], cohort=4, population=40)
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in new.values()))
    assert norm == pytest.approx(0.5 / 4, rel=1e-5)  # fixed denominator: the cohort, not the replies
    assert info["user-unclipped-fraction"] == pytest.approx(2 / 3)


def test_adaptive_clipping_moves_towards_the_target_quantile() -> None:
    dp = UserLevelDP(noise_multiplier=0.0, clipping_norm=0.1, adaptive=True, rng=np.random.default_rng(0))
    big = {k: np.full(s, 0.05, dtype=np.float32) for k, s in SHAPES.items()}  # norm ≈ 5.1 > S
    norms = []
    for _ in range(3):
        dp.release(_zeros(), [big] * 4, cohort=4, population=40)
        norms.append(dp.clipping_norm)
    assert norms == pytest.approx([0.1 * np.exp(0.2 * 0.5 * k) for k in (1, 2, 3)])


def test_epsilon_composes_over_rounds_with_the_cohort_sampling_rate() -> None:
    dp = UserLevelDP(noise_multiplier=1.0, clipping_norm=0.1, rng=np.random.default_rng(0))
    eps = [dp.release(_zeros(), [_zeros()] * 5, cohort=5, population=50)[1]["user-epsilon"] for _ in range(3)]
    history = compose(compose(compose([], 1.0, 0.1, 1), 1.0, 0.1, 1), 1.0, 0.1, 1)
    assert eps[0] < eps[1] < eps[2] == pytest.approx(epsilon(history, 1e-6, "prv"))  # δ = min(1e-6, 0.1/N)
    assert UserLevelDP(noise_multiplier=1.0, clipping_norm=0.1, sampling="none").sample_rate(5, 50) == 1.0


def test_strategy_releases_noisy_mean_refuses_past_budget_and_resumes_history(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    def run_round(strategy, rnd: int):  # type: ignore[no-untyped-def]
        strategy._cohort, strategy._population = 3, 3
        moved = {k: v + 0.01 for k, v in model.initial.items()}
        replies = [reply(n + 1, moved, client_metrics(n, 10 * (n + 1))) for n in range(3)]
        return strategy.aggregate_train(rnd, replies)

    dp = UserLevelDP(
        noise_multiplier=2.0, clipping_norm=0.01, budget=1.0, delta=0.01, rng=np.random.default_rng(1)
    )
    strategy = make_strategy(model, tmp_path, user_dp=dp)
    arrays, _ = run_round(strategy, 1)
    assert arrays is not None  # uniform mean of clipped updates + noise, not the weighted average
    released = [e for e in Ledger(tmp_path / "ledger.json").entries if e.get("scope") == "user-level"]
    assert released[0]["status"] == "released" and released[0]["user-epsilon"] < 1.0
    for rnd in range(2, 40):
        run_round(strategy, rnd)
    statuses = [
        e["status"] for e in Ledger(tmp_path / "ledger.json").entries if e.get("scope") == "user-level"
    ]
    assert "refused" in statuses and statuses.index("refused") > 0
    assert max(e["user-epsilon"] for e in Ledger(tmp_path / "ledger.json").user_level_entries()) <= 1.0
    # A new strategy on the same ledger (a resumed or continued federation) restores the history.
    again = make_strategy(model, tmp_path, user_dp=UserLevelDP(noise_multiplier=5.0, clipping_norm=0.01))
    assert again.user_dp is not None
    assert sum(steps for _, _, steps in again.user_dp.history) == statuses.count("released")


class _Nodes:
    """The part of a Grid the samplers read: the connected node ids."""

    def __init__(self, count: int) -> None:
        self.ids = list(range(101, 101 + count))

    def get_node_ids(self) -> list[int]:
        return self.ids


def test_cohorts_are_poisson_samples_when_accounted_as_such(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    """With user-level DP and q < 1 each node is asked independently with probability q, as accounted."""
    from flwr.app import ArrayRecord, ConfigRecord

    dp = UserLevelDP(noise_multiplier=1.0, clipping_norm=0.1)
    strategy = make_strategy(model, tmp_path, user_dp=dp, fraction_train=0.25)
    grid, arrays = _Nodes(40), ArrayRecord({})
    sizes = []
    for rnd in range(1, 301):
        sent = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid))  # type: ignore[arg-type]
        assert len({m.metadata.dst_node_id for m in sent}) == len(sent) <= 40
        assert strategy._cohort == 10.0 and strategy._population == 40  # the expected cohort q·N
        sizes.append(len(sent))
    assert len(set(sizes)) > 5 and abs(np.mean(sizes) - 10) < 0.6  # binomial(40, 0.25): sd 2.7, se 0.16
    assert np.var(sizes) == pytest.approx(40 * 0.25 * 0.75, rel=0.35)
    fixed = make_strategy(
        model, tmp_path / "fixed", user_dp=UserLevelDP(1.0, 0.1, sampling="none"), fraction_train=0.25
    )
    assert {len(list(fixed.configure_train(1, arrays, ConfigRecord({}), grid))) for _ in range(5)} == {10}


def test_a_poisson_round_releases_and_accounts_even_when_nobody_was_drawn(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    dp = UserLevelDP(noise_multiplier=1.0, clipping_norm=0.1, rng=np.random.default_rng(3))
    strategy = make_strategy(model, tmp_path, user_dp=dp, fraction_train=0.1)
    strategy._cohort, strategy._population = 2.0, 20
    arrays, _ = strategy.aggregate_train(1, [])
    assert arrays is not None  # noise only: skipping it would reveal that the cohort was empty
    moved = [float(np.abs(v.numpy() - model.initial[k]).max()) for k, v in arrays.items()]
    assert max(moved) > 0
    entry = Ledger(tmp_path / "ledger.json").user_level_entries()[0]
    assert entry["user-replies"] == 0 and entry["user-cohort"] == 2.0 and entry["user-sample-rate"] == 0.1
    assert 0 < entry["user-epsilon"] < float("inf")


def test_a_zero_noise_multiplier_with_a_budget_is_calibrated_to_spend_it_over_the_run(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    dp = UserLevelDP(noise_multiplier=0.0, clipping_norm=0.1, budget=2.0, rng=np.random.default_rng(5))
    strategy = make_strategy(model, tmp_path, user_dp=dp, fraction_train=0.05)  # total_rounds = 2
    for rnd in (1, 2):
        strategy._cohort, strategy._population = 5.0, 100
        assert strategy.aggregate_train(rnd, [])[0] is not None
    entries = Ledger(tmp_path / "ledger.json").user_level_entries()
    z = entries[0]["user-noise-multiplier"]
    assert z > 0 and entries[1]["user-noise-multiplier"] == z  # calibrated once, for both rounds
    assert entries[-1]["user-epsilon"] == pytest.approx(2.0, rel=0.02) and entries[-1]["user-epsilon"] <= 2.0
    assert epsilon(compose([], z * 0.99, 0.05, 2), 1e-6, "prv") > 2.0  # the smallest z that fits


def test_a_cross_device_run_reports_its_user_level_guarantee(tmp_path: Path) -> None:
    """Poisson cohorts, calibrated z, the head as the shared part; a local run releases nothing."""
    from conftest import TINY_TRAIN

    from simulations.compare import table
    from simulations.sequential import run_sequential

    run = {
        **TINY_TRAIN,
        "model.frozen-layers": 4,
        "lora.r": 0,
        "task.train-size": 12,
        "task.test-size": 6,
        "fed.num-rounds": 2,
        "fed.fraction-train": 0.25,
        "fed.min-clients": 1,
        "dp.enabled": False,
        "dp.user-level": True,
        "dp.user-noise-multiplier": 0.0,
        "dp.user-epsilon": 4.0,
    }
    shared = run_sequential({**run, "personalization.mode": "fedbias"}, 16, tmp_path / "fedbias")
    assert shared["user-epsilon"] <= 4.0 and shared["user-population"] == 16
    assert shared["user-sample-rate"] == 0.25 and shared["user-noise-multiplier"] > 0
    assert "User-level DP (server): ε = " in (tmp_path / "fedbias" / "report.md").read_text()
    assert shared["user-epsilon-within-user"] > shared["user-epsilon"]  # a change within one user's data
    assert "one user's data" in (tmp_path / "fedbias" / "report.md").read_text()
    alone = run_sequential({**run, "personalization.mode": "local"}, 16, tmp_path / "local")
    assert "user-epsilon" not in alone and not Ledger(tmp_path / "local" / "ledger.json").user_level_entries()
    text = table([{"mode": "fedbias", **shared}, {"mode": "local", **alone}])
    assert "| user-level ε |" in text and "| local |" in text


def test_deployment_scale_accounting_noises_for_the_virtual_cohort_and_says_so(tmp_path: Path) -> None:
    """dp.user-virtual-cohort: noise z·S/C on the mean, q = C/N_v, δ for N_v; labelled in the report."""
    from conftest import TINY_TRAIN

    from common.config import Config
    from common.errors import ConfigError
    from simulations.sequential import run_sequential

    dp = UserLevelDP(
        noise_multiplier=0.8, clipping_norm=0.5, virtual_cohort=5000, virtual_population=1_000_000,
        rng=np.random.default_rng(3),
    )  # fmt: skip
    current = _zeros()
    new, info = dp.release(current, [_zeros() for _ in range(40)], cohort=50, population=1000)
    noise = np.concatenate([(new[k] - current[k]).ravel() for k in SHAPES])
    assert info["user-noise-std"] == pytest.approx(0.8 * 0.5 / 5000)  # not / 50: the virtual cohort's mean
    assert noise.std() == pytest.approx(0.8 * 0.5 / 5000, rel=0.02)
    assert (info["user-sample-rate"], info["user-population"]) == (0.005, 1_000_000)
    assert info["user-delta"] == pytest.approx(1e-7)  # min(1e-6, 0.1 / N_v)
    assert info["user-virtual-cohort"] == 5000 and info["user-simulated-population"] == 1000
    assert info["user-epsilon"] == pytest.approx(epsilon(compose([], 0.8, 0.005, 1), 1e-7, "prv"))
    for bad in (
        {"dp.user-virtual-cohort": 5000},
        {"dp.user-virtual-cohort": 10, "dp.user-virtual-population": 10},
    ):
        with pytest.raises(ConfigError, match="dp.user-virtual-cohort"):
            Config.from_run_config({"dp.user-level": True, **bad})

    run = {
        **TINY_TRAIN, "model.frozen-layers": 4, "lora.r": 0, "task.train-size": 12, "task.test-size": 6,
        "fed.num-rounds": 2, "fed.fraction-train": 0.5, "fed.min-clients": 1, "dp.enabled": False,
        "dp.user-level": True, "dp.user-noise-multiplier": 0.0, "dp.user-epsilon": 8.0,
        "dp.user-virtual-cohort": 5000, "dp.user-virtual-population": 1_000_000,
        "personalization.mode": "fedbias",
    }  # fmt: skip
    out = run_sequential(run, 6, tmp_path)
    assert out["user-virtual-cohort"] == 5000 and out["user-simulated-population"] == 6
    assert out["user-population"] == 1_000_000 and out["user-epsilon"] <= 8.0
    assert "NOT a guarantee for the 6 users simulated" in (tmp_path / "report.md").read_text()
    from server.audit.ledger import audit_ledger

    audit = audit_ledger(tmp_path)  # the ledger's ε recomputes, and the audit says whose guarantee it is
    assert audit["ok"] and "NOT a guarantee for the users simulated" in audit["user_neighbouring"]
