"""The floor of ``fedpers bench sim-speed``: the benchmark's federated workload as bare compute, one process.

What the workload costs when nothing but the learning runs. Each client's data is loaded and its features
computed once, on first use (the task's own ``load`` and ``features``: the same tokenizer, frozen prefix
and pooling the clients use). ONE model is built. Per round, per sampled client, the loop only puts the
global shared tensors and that client's personal ones (a plain dict in memory) into the model, takes
the local optimizer steps of ``client.training``'s non-private loop (same optimizer and parameter groups,
learning rates, batch size, epochs, and the same per-client seed as ``client.node``), and keeps the
shared tensors it ends with. The server step is the example-weighted float64 average of
``server.validation`` followed by ``server.server_opt``'s step; with ``dp.user-level`` it is the release
of ``server.user_dp`` with fixed clipping: each update clipped to S, summed, divided by the fixed
denominator m (q·N under Poisson cohorts) and Gaussian noise z·S/m added to the mean (m of the noise:
``dp.user-virtual-cohort`` where set), a release every round, also an empty one. Clients are evaluated
with the task's ``evaluate`` every ``fed.evaluate-every`` rounds and after the last (where ``fedavg-ft``
fine-tunes a copy and ``personalization.final-fit`` refits the personal part first), and each trained
client before and after training when ``client.report-before-after`` is on, as the real clients do.

Nothing else: no Flower, no messages, no encrypted state files, no reply validation, no ledger, no
checkpoints, no accountant. The local loop is written out here instead of imported from
``client.training``, whose module imports Opacus and Flower (seconds a floor must not pay); the math is
the same, so on a non-private workload the floor trains the same shared tensors as the real clients from
the same seeds (up to float rounding from the order in which the server sums the replies).

Refused (ConfigError): sample-level DP-SGD (``dp.enabled``), adaptive user-level clipping, a user-level
budget (``dp.user-epsilon`` > 0: the real server calibrates z and may refuse a release), SecAgg+, and
``fed.fraction-evaluate`` other than 1. What the real run draws from OS entropy (Poisson cohorts and the
user-level noise) is drawn here from a generator seeded by ``task.seed``: the same work, other draws.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import Config
from common.errors import ConfigError, DataError
from common.features import Features
from common.split import split_names
from common.tasks import get_task
from server.server_opt import ServerOptimizer
from server.validation import weighted_average

Arrays = dict[str, np.ndarray]
RoundHook = Callable[[int, float], None]  # (round, time.time() at its end)


@dataclass
class _Client:
    """One client as the floor keeps it: its rows, features, personal tensors and rounds trained."""

    data: Any
    feats: dict[str, Features] = field(default_factory=dict)
    personal: Arrays = field(default_factory=dict)
    rounds_trained: int = 0


@dataclass
class FloorRun:
    """What :func:`federate` did: the final shared tensors, round end times and per-client accuracy."""

    shared: Arrays
    round_ends: list[float]
    accuracy: dict[int, float]  # each client's accuracy at the last evaluation
    cohorts: list[int]  # clients trained per round


def check_floor_config(cfg: Config) -> None:
    """Refuse what the floor does not reproduce (see the module docstring)."""
    d = cfg.dp
    reasons = [
        (d.enabled, "sample-level DP-SGD (dp.enabled = true)"),
        (d.user_level and d.user_clipping != "fixed", "adaptive user-level clipping"),
        (d.user_level and d.user_epsilon > 0, "a user-level budget (set dp.user-epsilon = 0 and a fixed z)"),
        (cfg.secagg.enabled, "SecAgg+"),
        (cfg.fed.fraction_evaluate != 1.0, "fed.fraction-evaluate other than 1"),
    ]
    bad = [why for refused, why in reasons if refused]
    if bad:
        raise ConfigError(f"the floor does not run {'; '.join(bad)}")


def client_seed(*parts: int) -> int:
    """client.node's process-independent seed of a client's local training."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """client.training's optimizer: LoRA at ``train.lr-lora``, the head at ``train.lr-head``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.startswith("head.")], "lr": cfg.train.lr_lora},
        {"params": [p for n, p in named if n.startswith("head.")], "lr": cfg.train.lr_head},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise DataError("nothing to train: the personalization mode left no trainable parameter")
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=cfg.train.momentum)


def local_steps(model: nn.Module, feats: Features, cfg: Config, epochs: int, seed: int) -> int:
    """client.training's non-private loop: shuffled batches, mean loss, one step each; returns the steps."""
    if len(feats) < 2:
        raise DataError(f"need at least 2 training examples, got {len(feats)}")
    losses = get_task(cfg).losses
    torch.manual_seed(seed)
    model.train()
    opt = _optimizer(model, cfg)
    steps = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(feats)).split(cfg.train.batch_size):
            opt.zero_grad(set_to_none=True)
            h, m, y = feats.batch(idx)
            (losses(model, h, m, y).sum() / len(idx)).backward()
            opt.step()
            steps += 1
    return steps


def user_level_release(
    current: Arrays, replies: list[Arrays], cohort: float, cfg: Config, rng: np.random.Generator
) -> Arrays:
    """current + Σ clip(Δᵢ, S) / m + N(0, (z·S/m)²) with fixed S (server.user_dp's release; m of the
    noise is ``dp.user-virtual-cohort`` where set)."""
    clip, z = cfg.dp.user_clipping_norm, cfg.dp.user_noise_multiplier
    noise_cohort = cfg.dp.user_virtual_cohort or cohort  # deployment-scale accounting: noise of C users
    names = sorted(current)
    total = [np.zeros_like(current[n], dtype=np.float64) for n in names]
    for reply in replies:
        update = [reply[n].astype(np.float64) - current[n] for n in names]
        norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for acc, u in zip(total, update, strict=True):
            acc += u * scale
    std = z * clip / noise_cohort
    return {
        n: (current[n] + acc / cohort + rng.normal(0.0, std, acc.shape)).astype(np.float32)
        for n, acc in zip(names, total, strict=True)
    }


class _Federation:
    """The floor's whole state: the task, the one model, the clients and the global shared tensors."""

    def __init__(self, cfg: Config, num_clients: int) -> None:
        self.cfg, self.num_clients = cfg, num_clients
        self.task = get_task(cfg)
        self.backbone = self.task.backbone()
        self.model = self.backbone.new_model()
        self.params = dict(self.model.named_parameters())
        roles = split_names(list(self.params), cfg.personalization.mode)
        self.shared_names, self.personal_names = roles["shared"], roles["personal"]
        for name, p in self.params.items():
            p.requires_grad_(name in self.shared_names or name in self.personal_names)
        self.initial_personal = self._take(self.personal_names)
        self.shared = self._take(self.shared_names)
        self.clients: dict[int, _Client] = {}
        self.server_opt = ServerOptimizer.from_config(cfg)
        self.rng = np.random.default_rng(cfg.task.seed)

    def _take(self, names: list[str]) -> Arrays:
        return {n: self.params[n].detach().numpy().astype(np.float32, copy=True) for n in names}

    @torch.no_grad()
    def _put(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            self.params[name].copy_(torch.from_numpy(value))

    def client(self, pid: int) -> _Client:
        """Client ``pid``, its rows loaded on first use."""
        if pid not in self.clients:
            self.clients[pid] = _Client(self.task.load(pid, self.num_clients))
        return self.clients[pid]

    def features(self, c: _Client, split: str) -> Features:
        """The client's ``split`` features, computed once."""
        if split not in c.feats:
            c.feats[split] = self.task.features(self.backbone, c.data, split)
        return c.feats[split]

    def load(self, c: _Client) -> None:
        """Global shared tensors and the client's personal ones into the one model."""
        self._put(self.shared)
        self._put(c.personal or self.initial_personal)

    def evaluate(self, c: _Client) -> float:
        """The client's test accuracy with what is in the model now."""
        return self.task.evaluate(self.model, self.features(c, "test")).accuracy

    def train(self, pid: int, rnd: int) -> tuple[Arrays, float]:
        """One client's local round: its shared tensors after training, and its number of examples."""
        c = self.client(pid)
        self.load(c)
        feats = self.features(c, "train")
        report = self.cfg.client.report_before_after
        if report:
            self.evaluate(c)
        seed = client_seed(self.cfg.task.seed, pid, rnd, c.rounds_trained)
        tau = self.cfg.train.personal_epochs
        if tau:  # FedRep, as client.node: the personal part alone, then the shared part alone
            self._steps_on(self.personal_names, feats, tau, seed)
            self._steps_on(self.shared_names, feats, self.cfg.train.local_epochs, client_seed(seed, 1))
        else:
            local_steps(self.model, feats, self.cfg, self.cfg.train.local_epochs, seed)
        if report:
            self.evaluate(c)
        c.rounds_trained += 1
        c.personal = self._take(self.personal_names)
        return self._take(self.shared_names), float(len(feats))

    def evaluate_client(self, pid: int, final: bool) -> float:
        """A client's evaluation round; at the final one ``fedavg-ft`` fine-tunes a copy first, and
        ``personalization.final-fit`` refits the personal part alone (kept), as client.node does."""
        c = self.client(pid)
        self.load(c)
        p = self.cfg.personalization
        if final and p.mode == "fedavg-ft" and p.finetune_epochs > 0:
            seed = client_seed(self.cfg.task.seed, pid, -1, c.rounds_trained)
            local_steps(self.model, self.features(c, "train"), self.cfg, p.finetune_epochs, seed)
        elif final and p.final_fit > 0 and self.personal_names:
            self._final_fit(pid, c)
        return self.evaluate(c)

    def _steps_on(self, names: list[str], feats: Features, epochs: int, seed: int) -> None:
        """``epochs`` of local steps on the tensors ``names`` alone, every other one frozen."""
        only = set(names)
        for name, p in self.params.items():
            p.requires_grad_(name in only)
        try:
            local_steps(self.model, feats, self.cfg, epochs, seed)
        finally:
            trainable = set(self.personal_names) | set(self.shared_names)
            for name, p in self.params.items():
                p.requires_grad_(name in trainable)

    def _final_fit(self, pid: int, c: _Client) -> None:
        """``final-fit`` epochs on the personal tensors alone, the shared ones frozen; keeps the result."""
        seed = client_seed(self.cfg.task.seed, pid, -2, c.rounds_trained)
        feats = self.features(c, "train")
        self._steps_on(self.personal_names, feats, self.cfg.personalization.final_fit, seed)
        c.personal = self._take(self.personal_names)

    def cohort(self) -> tuple[list[int], float]:
        """This round's clients and the user-level denominator m (expected q·N under Poisson)."""
        n, q, dp = self.num_clients, self.cfg.fed.fraction_train, self.cfg.dp
        if dp.user_level and dp.user_sampling == "poisson" and q < 1:
            return [i for i in range(n) if self.rng.random() < q], q * n
        size = min(n, max(int(n * q), self.cfg.fed.min_clients))
        chosen = list(range(n)) if size == n else sorted(self.rng.choice(n, size, replace=False).tolist())
        return chosen, float(size)

    def step(self, replies: list[tuple[Arrays, float]], cohort: float) -> None:
        """The server's step on the shared tensors from this round's replies."""
        if not self.shared_names:
            return
        if self.cfg.dp.user_level:
            new = user_level_release(self.shared, [a for a, _ in replies], cohort, self.cfg, self.rng)
        elif replies:
            new = weighted_average(replies, self.shared_names)
        else:
            return
        self.shared = self.server_opt.step(self.shared, new)


def federate(overrides: Mapping[str, Any], num_clients: int, on_round: RoundHook | None = None) -> FloorRun:
    """Run ``fed.num-rounds`` rounds of the workload over ``num_clients`` clients as bare compute."""
    cfg = Config.from_run_config(dict(overrides))
    check_floor_config(cfg)
    if num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {num_clients}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    fed = _Federation(cfg, num_clients)
    rounds = cfg.fed.num_rounds
    ends: list[float] = []
    accuracy: dict[int, float] = {}
    cohorts: list[int] = []
    for rnd in range(1, rounds + 1):
        chosen, denominator = fed.cohort()
        fed.step([fed.train(pid, rnd) for pid in chosen], denominator)
        cohorts.append(len(chosen))
        if rnd == rounds or rnd % cfg.fed.evaluate_every == 0:
            accuracy = {pid: fed.evaluate_client(pid, rnd == rounds) for pid in range(num_clients)}
        ends.append(time.time())
        if on_round:
            on_round(rnd, ends[-1])
    return FloorRun(fed.shared, ends, accuracy, cohorts)


def run_floor(
    overrides: Mapping[str, Any], num_clients: int, on_round: RoundHook | None = None
) -> dict[str, Any]:
    """:func:`federate` as a JSON-ready summary: round end times (epoch seconds) and the final accuracy."""
    start = time.time()
    run = federate(overrides, num_clients, on_round)
    accs = list(run.accuracy.values())
    return {
        "runner": "floor",
        "clients": num_clients,
        "rounds": len(run.round_ends),
        "round-ends": run.round_ends,
        "cohorts": run.cohorts,
        "seconds": time.time() - start,
        "acc-mean": float(np.mean(accs)) if accs else 0.0,
    }
