"""Privacy accounting across rounds and runs, σ calibration and the budget stop (real clients, tiny model)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAIN
from opacus.accountants import create_accountant

from client.node import NodeInfo, run_evaluate, run_train
from client.state import KEY_ENV, STATE_FILE, PersonalState, StateStore
from common import protocol as P
from common.config import Config
from common.errors import ConfigError, PrivacyBudgetExhausted
from common.params import get_arrays
from common.privacy import calibrate_sigma, compose, epsilon, normalize
from common.split import split_names
from common.tasks import get_backbone

BASE = dict(TINY_TRAIN)
N, Q, STEPS = 60, 1 / 3, 3  # train examples, sample rate, DP steps per round for BASE
DELTA = min(1e-5, 0.1 / N)  # the default sample-level δ (dp.delta = 0)


def _cfg(**over: object) -> Config:
    return Config.from_run_config({**BASE, **over})


def _initial_shared(cfg: Config) -> dict[str, np.ndarray]:
    template = get_backbone(cfg).template
    names = [n for n, _ in template.named_parameters()]
    return get_arrays(template, split_names(names, cfg.personalization.mode)["shared"])


def _fresh_eps(sigma: float, q: float, steps: int, accountant: str, delta: float = DELTA) -> float:
    """ε of ONE Opacus accountant stepped ``steps`` times (independent of common.privacy)."""
    acc = create_accountant(mechanism=accountant)
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


# --- pure accounting -------------------------------------------------------------------------------


def test_compose_merges_and_appends() -> None:
    h: list[tuple[float, float, int]] = [(1.0, 0.1, 5)]
    assert compose(h, 1.0, 0.1, 3) == [(1.0, 0.1, 8)]
    assert compose(h, 1.1, 0.1, 3) == [(1.0, 0.1, 5), (1.1, 0.1, 3)]
    assert compose(h, 1.0, 0.2, 3) == [(1.0, 0.1, 5), (1.0, 0.2, 3)]
    assert compose(h, 2.0, 0.1, 0) == h
    assert compose([], 2.0, 0.1, 4) == [(2.0, 0.1, 4)]
    assert h == [(1.0, 0.1, 5)]  # not mutated


def test_normalize_validates() -> None:
    assert normalize([[1, 0.5, 3]]) == [(1.0, 0.5, 3)]
    for bad in ([0.0, 0.5, 3], [1.0, 0.0, 3], [1.0, 1.5, 3], [1.0, 0.5, -1], [math.inf, 0.5, 1], [1.0, 0.5]):
        with pytest.raises(ConfigError):
            normalize([bad])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_one_accountant_over_all_steps(accountant: str) -> None:
    assert epsilon([], 1e-3, accountant) == 0.0
    assert epsilon([(1.0, 0.1, 0)], 1e-3, accountant) == 0.0
    split = [(1.0, 0.1, 4), (1.0, 0.1, 6)]
    whole = epsilon([(1.0, 0.1, 10)], 1e-3, accountant)
    assert epsilon(split, 1e-3, accountant) == pytest.approx(whole, rel=1e-6)
    assert whole == pytest.approx(_fresh_eps(1.0, 0.1, 10, accountant, 1e-3), rel=1e-9)
    assert epsilon([(1.0, 0.1, 4)], 1e-3, accountant) < whole


@pytest.mark.parametrize(
    ("accountant", "history"),
    [("rdp", []), ("rdp", [(1.5, 0.2, 10)])],
)
def test_calibrate_sigma_is_tight(accountant: str, history: list[tuple[float, float, int]]) -> None:
    budget, delta, q, steps = 4.0, 1e-3, 0.25, 12
    sigma = calibrate_sigma(
        budget=budget, delta=delta, sample_rate=q, steps=steps, history=history, accountant=accountant
    )
    assert epsilon(compose(history, sigma, q, steps), delta, accountant) <= budget
    assert epsilon(compose(history, 0.98 * sigma, q, steps), delta, accountant) > budget
    if history:  # the old spend leaves less budget, so more noise is needed than from scratch
        assert sigma > calibrate_sigma(
            budget=budget, delta=delta, sample_rate=q, steps=steps, history=[], accountant=accountant
        )


def test_calibrate_sigma_refuses_spent_budget() -> None:
    history = [(0.5, 0.5, 200)]
    assert epsilon(history, 1e-3, "rdp") > 4.0
    with pytest.raises(PrivacyBudgetExhausted, match="exhausted"):
        calibrate_sigma(budget=4.0, delta=1e-3, sample_rate=0.25, steps=3, history=history, accountant="rdp")


def test_calibrate_sigma_errors() -> None:
    with pytest.raises(ConfigError, match="zero"):
        calibrate_sigma(budget=4.0, delta=1e-3, sample_rate=0.25, steps=0, history=[], accountant="rdp")
    with pytest.raises(PrivacyBudgetExhausted, match="no noise multiplier"):
        calibrate_sigma(budget=1e-3, delta=1e-5, sample_rate=1.0, steps=10_000, history=[], accountant="rdp")


# --- the persisted accountant across rounds ---------------------------------------------------------


@pytest.fixture(scope="module", params=["rdp", "prv"])
def three_rounds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    accountant = request.param
    mp = pytest.MonkeyPatch()
    mp.delenv(KEY_ENV, raising=False)
    try:
        cfg = _cfg(**{"dp.accountant": accountant})
        node = NodeInfo(0, 4, tmp_path_factory.mktemp(f"state-{accountant}"), run_id=7)
        shared = _initial_shared(cfg)
        metrics, histories, states = [], [], []
        for rnd in (1, 2, 3):
            shared, m = run_train(cfg, node, shared, rnd)
            metrics.append(m)
            state = StateStore(node.state_dir).load()
            assert state is not None
            states.append(state)
            histories.append(state.history)
    finally:
        mp.undo()
    return {
        "accountant": accountant,
        "cfg": cfg,
        "metrics": metrics,
        "histories": histories,
        "states": states,
    }


def test_rounds_compose_into_one_history(three_rounds: dict) -> None:
    sigma = three_rounds["metrics"][0][P.SIGMA]
    for k, (m, hist) in enumerate(
        zip(three_rounds["metrics"], three_rounds["histories"], strict=True), start=1
    ):
        assert m[P.SIGMA] == sigma, "σ is calibrated once per run"
        assert m[P.SAMPLE_RATE] == Q and m[P.DELTA] == DELTA
        assert m[P.STEPS] == STEPS and m[P.TOTAL_STEPS] == k * STEPS
        assert hist == [(sigma, Q, k * STEPS)]


def test_eps_after_k_rounds_equals_one_accountant_over_all_steps(three_rounds: dict) -> None:
    acc = three_rounds["accountant"]
    sigma = three_rounds["metrics"][0][P.SIGMA]
    final = three_rounds["histories"][-1]
    whole = epsilon([(sigma, Q, 3 * STEPS)], DELTA, acc)
    assert epsilon(final, DELTA, acc) == pytest.approx(whole, rel=1e-9)
    assert three_rounds["metrics"][-1][P.EPSILON] == pytest.approx(
        _fresh_eps(sigma, Q, 3 * STEPS, acc), rel=1e-9
    )


def test_reported_eps_equals_eps_of_history_so_far(three_rounds: dict) -> None:
    acc = three_rounds["accountant"]
    for m, hist in zip(three_rounds["metrics"], three_rounds["histories"], strict=True):
        assert m[P.EPSILON] == pytest.approx(epsilon(hist, DELTA, acc), rel=1e-9)


def test_eps_increases_and_ends_at_the_budget(three_rounds: dict) -> None:
    eps = [m[P.EPSILON] for m in three_rounds["metrics"]]
    assert 0 < eps[0] < eps[1] < eps[2]
    budget = three_rounds["cfg"].dp.epsilon
    assert eps[2] <= budget * (1 + 1e-9)
    assert eps[2] >= 0.95 * budget, "σ calibrated for the planned rounds should use (nearly) all the budget"
    # Tight: 2 % less noise over the same steps would have overspent.
    sigma = three_rounds["metrics"][0][P.SIGMA]
    assert epsilon([(0.98 * sigma, Q, 3 * STEPS)], DELTA, three_rounds["accountant"]) > budget


def test_state_counters_and_plan(three_rounds: dict) -> None:
    sigma = three_rounds["metrics"][0][P.SIGMA]
    for k, st in enumerate(three_rounds["states"], start=1):
        assert st.rounds_trained == k
        assert st.examples_seen == k * N
        assert st.run_plan == {"run_id": 7, "sigma": sigma, "sample_rate": Q, "delta": DELTA}


# --- the budget stop --------------------------------------------------------------------------------


def _files(state_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state_dir.iterdir())}


def test_budget_stop_leaves_state_untouched(tmp_path: Path) -> None:
    cfg = _cfg(**{"fed.num-rounds": 2, "dp.accountant": "rdp"})
    node = NodeInfo(1, 4, tmp_path, run_id=1)
    shared = _initial_shared(cfg)
    for rnd in (1, 2):
        shared, m = run_train(cfg, node, shared, rnd)
    assert cfg.dp.epsilon * 0.97 <= m[P.EPSILON] <= cfg.dp.epsilon, "round 2 ends just under the budget"
    before = _files(tmp_path)
    assert STATE_FILE in before
    state_before = StateStore(tmp_path).load()
    assert state_before is not None
    with pytest.raises(PrivacyBudgetExhausted, match="budget"):
        run_train(cfg, node, shared, 3)
    assert _files(tmp_path) == before, "the refused round must not touch the state on disk"
    after = StateStore(tmp_path).load()
    assert after is not None
    assert after.history == state_before.history
    assert after.rounds_trained == 2
    assert set(after.tensors) == set(state_before.tensors)
    for k, v in after.tensors.items():
        assert np.array_equal(v, state_before.tensors[k])
    # Evaluation spends nothing and still works; it reports the ε spent. (It stores the latest global
    # tensors for `fedpers predict`; the privacy history and the personal part stay as they were.)
    ev = run_evaluate(cfg, node, shared, final_round=True)
    assert ev[P.EPSILON] == pytest.approx(m[P.EPSILON], rel=1e-12)
    evaluated = StateStore(tmp_path).load()
    assert evaluated is not None and evaluated.history == state_before.history
    assert evaluated.rounds_trained == 2 and set(evaluated.shared) == set(shared)
    assert all(np.array_equal(v, state_before.tensors[k]) for k, v in evaluated.tensors.items())


def test_new_run_composes_with_old_history(tmp_path: Path) -> None:
    cfg = _cfg(**{"fed.num-rounds": 2, "dp.accountant": "rdp"})
    shared0 = _initial_shared(cfg)
    _, m1 = run_train(cfg, NodeInfo(2, 4, tmp_path, run_id=1), shared0, 1)
    sigma1 = m1[P.SIGMA]
    old = StateStore(tmp_path).load()
    assert old is not None and old.history == [(sigma1, Q, STEPS)]
    # A new run (another run id) plans 2 more rounds on the same state: σ is recalibrated for what is left.
    node2 = NodeInfo(2, 4, tmp_path, run_id=2)
    shared, m2 = run_train(cfg, node2, shared0, 1)
    sigma2 = m2[P.SIGMA]
    expected = calibrate_sigma(
        budget=cfg.dp.epsilon,
        delta=DELTA,
        sample_rate=Q,
        steps=2 * STEPS,
        history=old.history,
        accountant="rdp",
    )
    assert sigma2 == pytest.approx(expected, rel=1e-12)
    assert sigma2 > sigma1
    _, m3 = run_train(cfg, node2, shared, 2)
    assert m3[P.SIGMA] == sigma2
    final = StateStore(tmp_path).load()
    assert final is not None
    assert final.history == [(sigma1, Q, STEPS), (sigma2, Q, 2 * STEPS)]
    assert final.rounds_trained == 3
    assert m3[P.TOTAL_STEPS] == 3 * STEPS
    assert m3[P.EPSILON] == pytest.approx(epsilon(final.history, DELTA, "rdp"), rel=1e-9)
    assert m1[P.EPSILON] < m2[P.EPSILON] < m3[P.EPSILON] <= cfg.dp.epsilon * (1 + 1e-9)
    assert m3[P.EPSILON] >= 0.97 * cfg.dp.epsilon


def test_spent_history_refuses_a_new_run_without_touching_state(tmp_path: Path) -> None:
    cfg = _cfg(**{"dp.accountant": "rdp"})
    spent = [(0.5, Q, 300)]
    assert epsilon(spent, DELTA, "rdp") > cfg.dp.epsilon
    StateStore(tmp_path).save(PersonalState(history=spent, rounds_trained=5, examples_seen=300))
    before = _files(tmp_path)
    with pytest.raises(PrivacyBudgetExhausted):
        run_train(cfg, NodeInfo(0, 4, tmp_path, run_id=99), _initial_shared(cfg), 1)
    assert _files(tmp_path) == before


def test_fixed_noise_multiplier_is_used_and_accounted(tmp_path: Path) -> None:
    cfg = _cfg(**{"dp.noise-multiplier": 1.7, "dp.accountant": "rdp"})
    _, m = run_train(cfg, NodeInfo(3, 4, tmp_path, run_id=1), _initial_shared(cfg), 1)
    assert m[P.SIGMA] == 1.7
    state = StateStore(tmp_path).load()
    assert state is not None and state.history == [(1.7, Q, STEPS)]
    assert m[P.EPSILON] == pytest.approx(_fresh_eps(1.7, Q, STEPS, "rdp"), rel=1e-9)


def test_no_dp_reports_no_epsilon_and_keeps_history_empty(tmp_path: Path) -> None:
    cfg = _cfg(**{"dp.enabled": False})
    _, m = run_train(cfg, NodeInfo(3, 4, tmp_path, run_id=1), _initial_shared(cfg), 1)
    assert P.EPSILON not in m and m[P.STEPS] == STEPS
    state = StateStore(tmp_path).load()
    assert state is not None and state.history == [] and state.rounds_trained == 1


def test_fedavg_ft_final_finetune_is_accounted_and_not_kept(tmp_path: Path) -> None:
    cfg = _cfg(**{"personalization.mode": "fedavg-ft", "dp.noise-multiplier": 1.0, "dp.accountant": "rdp"})
    node = NodeInfo(3, 4, tmp_path, run_id=1)
    shared, _ = run_train(cfg, node, _initial_shared(cfg), 1)
    history_before = StateStore(tmp_path).load().history  # type: ignore[union-attr]
    ev = run_evaluate(cfg, node, shared, final_round=False)  # not final: no fine-tuning, nothing spent
    assert StateStore(tmp_path).load().history == history_before  # type: ignore[union-attr]
    assert ev[P.EPSILON] == pytest.approx(_fresh_eps(1.0, Q, STEPS, "rdp"), rel=1e-9)
    ev_final = run_evaluate(cfg, node, shared, final_round=True)
    state = StateStore(tmp_path).load()
    assert state is not None
    assert state.history == [(1.0, Q, 2 * STEPS)], "the fine-tune's DP steps are accounted"
    assert state.rounds_trained == 1 and state.tensors == {}
    assert ev_final[P.STEPS] == STEPS
    assert ev_final[P.EPSILON] == pytest.approx(_fresh_eps(1.0, Q, 2 * STEPS, "rdp"), rel=1e-9)
