"""One client's handling of a train or evaluate instruction, independent of Flower's message types.

Flow of a train instruction (DESIGN.md): load data and the encrypted personal state → build the model
→ load the shared tensors (exact key set) and the personal ones → budget check BEFORE training →
DP-SGD over every trainable tensor with the persisted accountant → save state atomically → return ONLY
the shared tensors, taken from the unwrapped module, and scalar metrics.
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.feature_cache import FeatureCache
from client.state import PersonalState, StateStore
from client.training import DPPlan, TrainOutcome, sample_rate, steps_per_epoch, train
from common import protocol as P
from common.config import Config
from common.device import place, resolve_device
from common.errors import DeviceRefusal, PrivacyBudgetExhausted, StateError
from common.features import Features
from common.model import head_view
from common.params import get_arrays, nbytes, set_arrays
from common.privacy import SAMPLE_DELTA, calibrate_sigma, check_delta, compose, default_delta, epsilon
from common.split import Role, split_names
from common.tasks import Backbone, Task, get_task

log = logging.getLogger("flwr")
Arrays = dict[str, np.ndarray]
Metrics = dict[str, float | int]


@dataclass(frozen=True)
class NodeInfo:
    """Who this client is and where it keeps its state."""

    partition_id: int
    num_partitions: int
    state_dir: Path
    run_id: int
    data_path: str | None = None
    key_file: str | None = None
    device: str = "auto"  # auto | cpu | cuda[:N] | mps (node_config "device"; see common.device)
    max_physical_batch: int = 0  # examples per forward/backward pass on this device (0 = no cap)
    feature_cache: Path | None = None  # folder for this client's encrypted prefix features (None = off)
    max_epsilon: float | None = None  # the device's own ε cap over all runs (None: the run's budget)
    delta: float = 0.0  # the device's δ (0: the run's dp.delta, else min(1e-5, 0.1/n))
    allow_no_dp: bool = True  # whether the device accepts a run with dp.enabled = false


def check_device_limits(cfg: Config, node: NodeInfo) -> None:
    """Refuse, before anything is loaded, a run that asks for more than this device allows."""
    if not cfg.dp.enabled:
        if not node.allow_no_dp:
            raise DeviceRefusal(
                "the run asks to train without sample-level DP (dp.enabled = false); this device trains "
                "only under DP (start its agent with --allow-no-dp to accept)"
            )
        return
    cap = node.max_epsilon
    if cap is not None and cfg.dp.epsilon > cap * (1 + 1e-9):
        raise DeviceRefusal(
            f"the run asks for a budget of ε = {cfg.dp.epsilon:g}; this device caps its privacy loss over "
            f"all runs at ε = {cap:g} (fedpers agent --max-epsilon)"
        )
    if node.delta > 0 and cfg.dp.delta > node.delta:
        raise DeviceRefusal(
            f"the run asks for δ = {cfg.dp.delta:g}; this device accounts at δ ≤ {node.delta:g} "
            "(fedpers agent --delta)"
        )


def device_delta(cfg: Config, node: NodeInfo, n: int) -> float:
    """δ of this device's sample-level guarantee for ``n`` training examples (refused if ≥ 1/n)."""
    asked = cfg.dp.delta or node.delta
    if not asked:
        return default_delta(n, SAMPLE_DELTA)
    try:
        return check_delta(asked, n, "dp.delta; n = this client's training examples")
    except ValueError as exc:
        raise DeviceRefusal(str(exc)) from exc


@dataclass
class _Session:
    task: Task
    data: Any  # the task's rows of this user
    backbone: Backbone
    model: nn.Module
    roles: dict[Role, list[str]]
    store: StateStore
    state: PersonalState
    device: torch.device
    cache: FeatureCache | None = None

    @functools.cached_property
    def train(self) -> Features:
        """Training features (computed on first use: an evaluation without fine-tuning never needs them)."""
        return self._features("train")

    @functools.cached_property
    def test(self) -> Features:
        """Test features (cached per process by common.features)."""
        return self._features("test")

    def _features(self, split: str) -> Features:
        feats = self.task.features(self.backbone, self.data, split, device=self.device, store=self.cache)
        return feats.to(self.device)


def _seed(*parts: int) -> int:
    """A process-independent seed (Python's hash() of tuples is salted per process)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _open(cfg: Config, node: NodeInfo, shared: Arrays) -> _Session:
    task = get_task(cfg)
    data = task.load(node.partition_id, node.num_partitions, node.data_path)
    backbone = task.backbone()
    device = resolve_device(node.device)
    place(backbone, device)  # the model is born on the device, with the frozen weights it shares
    model = backbone.new_model()
    roles = split_names([n for n, _ in model.named_parameters()], cfg.personalization.mode)
    store = StateStore(node.state_dir, node.key_file)
    state = store.load() or PersonalState(
        meta={"mode": cfg.personalization.mode, "model": backbone.fingerprint}
    )
    if state.meta.get("model") not in (None, backbone.fingerprint):
        raise StateError(
            f"personal state in {node.state_dir} was made for another model/adapter configuration "
            f"({state.meta.get('model')} != {backbone.fingerprint}); use a new client.state-root"
        )
    set_arrays(model, shared, roles["shared"])
    if state.tensors:
        set_arrays(model, state.tensors, roles["personal"])
    for name, param in model.named_parameters():
        param.requires_grad_(name in roles["shared"] or name in roles["personal"])
    cache = FeatureCache(node.feature_cache, node.key_file) if node.feature_cache else None
    return _Session(task, data, backbone, model, roles, store, state, device, cache)


def _plan(cfg: Config, s: _Session, node: NodeInfo, rounds_left: int) -> DPPlan:
    """σ for this run: calibrated once per run against the client's whole history, then reused.

    The plan covers the rounds left in this run (all of them for a client that joins at round 1, fewer
    for a resumed run or a late joiner), assuming the client is sampled in every one of them.
    """
    n = len(s.train)
    q = sample_rate(n, cfg.train.batch_size)
    delta = device_delta(cfg, node, n)
    plan = s.state.run_plan
    if plan.get("run_id") == node.run_id and plan.get("sample_rate") == q and plan.get("delta") == delta:
        return DPPlan(float(plan["sigma"]), q, delta)
    if cfg.dp.noise_multiplier > 0:
        sigma = cfg.dp.noise_multiplier
    else:
        spe = steps_per_epoch(n, cfg.train.batch_size)
        planned = rounds_left * (cfg.train.local_epochs + cfg.train.personal_epochs) * spe
        if cfg.personalization.mode == "fedavg-ft":
            planned += cfg.personalization.finetune_epochs * spe
        planned += cfg.personalization.final_fit * spe
        sigma = calibrate_sigma(
            budget=cfg.dp.epsilon,
            delta=delta,
            sample_rate=q,
            steps=planned,
            history=s.state.history,
            accountant=cfg.dp.accountant,
        )
    s.state.run_plan = {"run_id": node.run_id, "sigma": sigma, "sample_rate": q, "delta": delta}
    return DPPlan(sigma, q, delta)


def _check_budget(cfg: Config, s: _Session, plan: DPPlan, steps: int) -> None:
    after = epsilon(
        compose(s.state.history, plan.sigma, plan.sample_rate, steps), plan.delta, cfg.dp.accountant
    )
    if after > cfg.dp.epsilon * (1 + 1e-9):  # the run's budget, never above the device's cap
        spent = epsilon(s.state.history, plan.delta, cfg.dp.accountant)
        raise PrivacyBudgetExhausted(
            f"privacy budget exhausted: ε={spent:.3f} now, {after:.3f} after {steps} more steps ≥ budget "
            f"{cfg.dp.epsilon} (δ={plan.delta:.2e}); this client trains no more"
        )


def _local_train(
    cfg: Config,
    s: _Session,
    node: NodeInfo,
    epochs: int,
    seed: int,
    rounds_left: int,
    checked: bool = False,
    on: tuple[nn.Module, Features] | None = None,
) -> tuple[TrainOutcome, DPPlan | None]:
    """``epochs`` of training under this run's DP plan; ``checked``: the caller already checked the budget
    for these steps (one ε computation per round, not one per phase); ``on``: train this model and these
    features (a view of the session's, as from ``head_view``) instead of the session's own."""
    model, feats = on if on is not None else (s.model, s.train)
    steps = epochs * steps_per_epoch(len(feats), cfg.train.batch_size)
    plan = None
    if cfg.dp.enabled:
        plan = _plan(cfg, s, node, rounds_left)
        if not checked:
            _check_budget(cfg, s, plan, steps)
    out = train(
        model,
        feats,
        cfg,
        epochs=epochs,
        plan=plan,
        history=s.state.history,
        seed=seed,
        physical_batch=node.max_physical_batch,
    )
    s.state.history = out.history
    return out, plan


def _trainable(s: _Session, *roles: Role) -> None:
    """Only the tensors of ``roles`` train; every other one (and the frozen base) stays fixed."""
    names = {n for role in roles for n in s.roles[role]}
    for name, param in s.model.named_parameters():
        param.requires_grad_(name in names)


def _train_round(
    cfg: Config, s: _Session, node: NodeInfo, seed: int, rounds_left: int
) -> tuple[TrainOutcome, DPPlan | None]:
    """One round's local training: the shared and personal parts together for ``train.local-epochs``,
    or, with ``train.personal-epochs`` > 0 (FedRep, Collins et al. 2021), the personal part alone first
    (shared frozen), then the shared part alone (personal frozen) against the freshly fitted personal part.

    Under sample-level DP both phases are DP-SGD steps on the one accountant; the budget is checked for
    both before either runs, so a round never stops half done. The loss reported is the shared phase's.
    """
    tau = cfg.train.personal_epochs
    if tau == 0:
        return _local_train(cfg, s, node, cfg.train.local_epochs, seed, rounds_left)
    if cfg.dp.enabled:
        spe = steps_per_epoch(len(s.train), cfg.train.batch_size)
        _check_budget(cfg, s, _plan(cfg, s, node, rounds_left), (tau + cfg.train.local_epochs) * spe)
    try:
        _trainable(s, "personal")
        head, _ = _local_train(cfg, s, node, tau, seed, rounds_left, checked=True)
        _trainable(s, "shared")
        body, plan = _local_train(
            cfg, s, node, cfg.train.local_epochs, _seed(seed, 1), rounds_left, checked=True
        )
    finally:
        _trainable(s, "shared", "personal")
    return TrainOutcome(body.loss, head.steps + body.steps, body.history, head.seconds + body.seconds), plan


def _privacy_metrics(cfg: Config, s: _Session, plan: DPPlan | None, steps: int) -> Metrics:
    if plan is None:  # not private: no ε to report
        return {P.STEPS: steps}
    return {
        P.EPSILON: epsilon(s.state.history, plan.delta, cfg.dp.accountant),
        P.DELTA: plan.delta,
        P.SIGMA: plan.sigma,
        P.SAMPLE_RATE: plan.sample_rate,
        P.STEPS: steps,
        P.TOTAL_STEPS: sum(e[2] for e in s.state.history),
    }


def _save(s: _Session) -> None:
    s.state.tensors = get_arrays(s.model, s.roles["personal"])
    s.store.save(s.state)


def run_train(cfg: Config, node: NodeInfo, shared: Arrays, server_round: int) -> tuple[Arrays, Metrics]:
    """Handle one train instruction; returns (shared arrays to send, metrics)."""
    check_device_limits(cfg, node)
    s = _open(cfg, node, shared)
    report = cfg.client.report_before_after  # two extra test passes per round: optional for speed
    before = s.task.evaluate(s.model, s.test) if report else None
    seed = _seed(cfg.task.seed, node.partition_id, server_round, s.state.rounds_trained)
    rounds_left = max(1, cfg.fed.num_rounds - server_round + 1) if server_round > 0 else cfg.fed.num_rounds
    outcome, plan = _train_round(cfg, s, node, seed, rounds_left)
    after = s.task.evaluate(s.model, s.test) if report else None
    s.state.rounds_trained += 1
    s.state.examples_seen += len(s.train)
    _save(s)
    out = get_arrays(s.model, s.roles["shared"])
    delta_norm = float(np.sqrt(sum(float(np.sum((out[k] - shared[k]) ** 2)) for k in out))) if out else 0.0
    metrics: Metrics = {
        P.NUM_EXAMPLES: len(s.train),
        P.PARTITION_ID: node.partition_id,
        P.LOSS: outcome.loss,
        P.TRAIN_SECONDS: outcome.seconds,
        P.BYTES_UP: nbytes(out),
        P.UPDATE_NORM: delta_norm,
    }
    if before is not None and after is not None:
        metrics.update({P.ACC_BEFORE: before.accuracy, P.ACC_AFTER: after.accuracy})
        metrics.update({f"{k}-before": v for k, v in before.metrics.items()})  # e.g. perplexity-before
    metrics.update(_privacy_metrics(cfg, s, plan, outcome.steps))
    return out, metrics


def _final_fit(cfg: Config, s: _Session, node: NodeInfo) -> tuple[TrainOutcome, DPPlan | None]:
    """Fit the personal part alone to the final shared tensors (``personalization.final-fit`` epochs).

    Under user-level sampling a user trains in a few rounds only, so its personal part was fitted to an
    old shared part; here it is refitted on the user's own train split with the shared tensors frozen,
    kept on the device (nothing is released) and, under sample-level DP, accounted like any training.
    """
    _trainable(s, "personal")
    seed = _seed(cfg.task.seed, node.partition_id, -2, s.state.rounds_trained)
    view = head_view(s.model, s.train)  # a head-only personal part: the frozen layers run once, not per epoch
    outcome, plan = _local_train(cfg, s, node, cfg.personalization.final_fit, seed, 0, on=view)
    s.state.tensors = get_arrays(s.model, s.roles["personal"])  # saved with the rest of the evaluation
    return outcome, plan


def run_evaluate(cfg: Config, node: NodeInfo, shared: Arrays, final_round: bool) -> Metrics:
    """Evaluate latest shared tensors + this client's personal part on its own test split.

    In ``fedavg-ft`` the final evaluation first fine-tunes a copy locally (under DP, accounted).
    """
    check_device_limits(cfg, node)
    s = _open(cfg, node, shared)
    plan = None
    steps = 0
    if cfg.personalization.mode == "fedavg-ft" and final_round and cfg.personalization.finetune_epochs > 0:
        seed = _seed(cfg.task.seed, node.partition_id, -1, s.state.rounds_trained)
        outcome, plan = _local_train(cfg, s, node, cfg.personalization.finetune_epochs, seed, 0)
        steps = outcome.steps
        s.store.save(s.state)  # the fine-tuned copy is not kept, the privacy spend is
    elif final_round and cfg.personalization.final_fit > 0 and s.roles["personal"]:
        outcome, plan = _final_fit(cfg, s, node)
        steps = outcome.steps
    ev = s.task.evaluate(s.model, s.test)
    metrics: Metrics = {
        P.NUM_EXAMPLES: len(s.test),
        P.PARTITION_ID: node.partition_id,
        P.EVAL_ACC: ev.accuracy,
        P.EVAL_LOSS: ev.loss,
        **ev.metrics,
        **s.task.baseline(s.data),
    }
    if cfg.dp.enabled and s.state.run_plan:
        delta = float(s.state.run_plan["delta"])
        metrics[P.EPSILON] = epsilon(s.state.history, delta, cfg.dp.accountant)
    if plan is not None:
        metrics.update(_privacy_metrics(cfg, s, plan, steps))
    # Keep the latest global tensors and the configuration on the device: `fedpers predict` works offline.
    s.state.shared = {k: np.asarray(v, dtype=np.float32) for k, v in shared.items()}
    s.state.meta["config"] = cfg.to_run_config()
    s.state.examples = s.task.chat_examples(s.backbone, s.data)
    s.store.save(s.state)
    return metrics
