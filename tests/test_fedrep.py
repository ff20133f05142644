"""``train.personal-epochs`` (FedRep): the personal part trains alone first, then the shared part alone.

The two phases must each move only their own tensors (never the frozen base), under sample-level DP both
must be accounted on the device's one accountant, and a round that would pass the budget must not start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

import client.node as node_mod
from client.node import NodeInfo, device_delta, run_train
from client.state import StateStore
from client.training import sample_rate, steps_per_epoch
from common.config import Config
from common.errors import ConfigError, PrivacyBudgetExhausted
from common.params import get_arrays
from common.privacy import compose, epsilon
from common.split import split_names
from common.tasks import get_task

FEDREP: dict[str, Any] = {**TINY_TRAIN, "dp.enabled": False, "train.personal-epochs": 2}


Call = tuple[int, set[str], set[str], int]  # epochs, trainable names, names that moved, examples


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Record each local training call of client.node: what could train, what moved, on how much data."""
    calls: list[Call] = []
    real = node_mod.train

    def spy(model: torch.nn.Module, feats: Any, *args: Any, epochs: int, **kwargs: Any) -> Any:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = real(model, feats, *args, epochs=epochs, **kwargs)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        calls.append((epochs, trainable, moved, len(feats)))
        return out

    monkeypatch.setattr(node_mod, "train", spy)
    return calls


def _shared(cfg: Config) -> dict[str, np.ndarray]:
    template = get_task(cfg).backbone().template
    names = split_names([n for n, _ in template.named_parameters()], cfg.personalization.mode)["shared"]
    return get_arrays(template, names)


@pytest.mark.parametrize("mode", ["fedper", "fedsa", "fedbias"])
def test_each_phase_moves_only_its_own_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Phase 1: the personal tensors alone for personal-epochs; phase 2: the shared ones for local-epochs."""
    over = {**FEDREP, "personalization.mode": mode, "train.local-epochs": 3}
    if mode == "fedbias":
        over.update({"lora.r": 0, "model.frozen-layers": 4})
    cfg = Config.from_run_config(over)
    calls = _spy(monkeypatch)
    out, metrics = run_train(cfg, NodeInfo(0, 4, tmp_path, run_id=1), _shared(cfg), 1)
    template = get_task(cfg).backbone().template
    roles = split_names([n for n, _ in template.named_parameters()], mode)
    personal, shared = set(roles["personal"]), set(roles["shared"])
    assert personal and shared
    assert [(e, t) for e, t, _, _ in calls] == [(2, personal), (3, shared)]
    assert calls[0][2] == personal and calls[1][2] == shared  # each phase changed all of its part, no more
    assert set(out) == shared  # only the shared part is sent
    state = StateStore(tmp_path).load()
    assert state is not None and set(state.tensors) == personal  # the personal part stays on the device
    assert metrics["steps"] == (2 + 3) * steps_per_epoch(calls[0][3], cfg.train.batch_size)


def test_under_sample_level_dp_both_phases_are_accounted(tmp_path: Path) -> None:
    cfg = Config.from_run_config({**FEDREP, "dp.enabled": True, "dp.epsilon": 8.0, "train.local-epochs": 1})
    node = NodeInfo(0, 4, tmp_path, run_id=1)
    _, metrics = run_train(cfg, node, _shared(cfg), 1)
    state = StateStore(tmp_path).load()
    assert state is not None
    n = len(get_task(cfg).load(0, 4).train_labels)
    assert metrics["steps"] == (2 + 1) * steps_per_epoch(n, cfg.train.batch_size)  # 2 personal + 1 shared
    assert sum(e[2] for e in state.history) == metrics["steps"] == metrics["total-steps"]
    assert 0 < metrics["epsilon"] <= 8.0
    # σ was calibrated for every planned step of the run: personal epochs included, so a full run of
    # fed.num-rounds rounds ends within the budget
    for rnd in (2, 3):
        _, metrics = run_train(cfg, node, _shared(cfg), rnd)
    assert metrics["epsilon"] <= 8.0 * (1 + 1e-9)


def test_a_round_that_would_pass_the_budget_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is checked for both phases before either: a round whose personal phase would still fit
    but whose shared phase would not trains nothing and writes nothing."""
    over = {**FEDREP, "dp.enabled": True, "dp.noise-multiplier": 1.0, "train.personal-epochs": 1}
    over["train.local-epochs"] = 5
    cfg = Config.from_run_config(over)
    node = NodeInfo(0, 4, tmp_path, run_id=1)
    n = len(get_task(cfg).load(0, 4).train_labels)
    spe, q = steps_per_epoch(n, cfg.train.batch_size), sample_rate(n, cfg.train.batch_size)
    delta = device_delta(cfg, node, n)

    def eps(epochs: int) -> float:
        return epsilon(compose([], 1.0, q, epochs * spe), delta, cfg.dp.accountant)

    budget = (eps(7) + eps(12)) / 2  # round 1 spends 6 epochs; round 2's first phase would fit, not both
    cfg = cfg.replace(**{"dp.epsilon": budget})
    run_train(cfg, node, _shared(cfg), 1)
    kept = StateStore(tmp_path).load()
    assert kept is not None and sum(e[2] for e in kept.history) == 6 * spe
    calls = _spy(monkeypatch)
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted"):
        run_train(cfg, node, _shared(cfg), 2)
    assert calls == []  # not even the personal phase ran
    again = StateStore(tmp_path).load()
    assert again is not None and again.history == kept.history
    assert all(np.array_equal(again.tensors[k], kept.tensors[k]) for k in kept.tensors)


@pytest.mark.parametrize("mode", ["local", "fedavg", "fedavg-ft"])
def test_modes_without_both_parts_are_refused(mode: str) -> None:
    with pytest.raises(ConfigError, match="train.personal-epochs = 2 alternates a personal and a shared"):
        Config.from_run_config({**FEDREP, "personalization.mode": mode})
