"""Local training: DP-SGD with Opacus over every trainable tensor (LoRA and head), or plain SGD.

The accountant is never fresh: the client's persisted history is restored into the PrivacyEngine before
``make_private`` and read back after training, so ε composes across rounds and runs.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import Config
from common.device import device_of
from common.errors import ConfigError, DataError
from common.features import Features
from common.params import unwrap
from common.privacy import History
from common.tasks import get_task

logging.getLogger("flwr").propagate = False


Losses = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # per example


@dataclass(frozen=True)
class DPPlan:
    """Noise and sampling for this client's DP-SGD steps."""

    sigma: float
    sample_rate: float
    delta: float


@dataclass(frozen=True)
class TrainOutcome:
    """What one call of :func:`train` did."""

    loss: float
    steps: int
    history: History
    seconds: float


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch (Opacus's Poisson sampler uses sample rate 1 / this)."""
    return max(1, -(-num_examples // batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q used by Opacus for this data size and expected batch size."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    lora = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    groups = [
        g
        for g in ({"params": lora, "lr": cfg.train.lr_lora}, {"params": head, "lr": cfg.train.lr_head})
        if g["params"]
    ]
    if not groups:
        raise DataError("nothing to train: the personalization mode left no trainable parameter")
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=cfg.train.momentum)


def train(
    model: nn.Module,
    feats: Features,
    cfg: Config,
    *,
    epochs: int,
    plan: DPPlan | None,
    history: History,
    seed: int,
    physical_batch: int = 0,
) -> TrainOutcome:
    """Train ``model`` in place for ``epochs`` over ``feats``; DP-SGD when ``plan`` is given.

    ``physical_batch`` caps how many examples go through one forward/backward pass (0 = the whole
    logical batch): a logical (Poisson) batch is then processed in slices whose per-example gradients
    accumulate before the one optimizer step, so a memory-bounded device trains the same mechanism
    (same sampling, clipping, noise and ε) as an unbounded one. Returns the new accountant history
    (unchanged without DP) and the mean training loss.
    """
    if physical_batch < 0:
        raise ConfigError(f"physical batch {physical_batch} must be >= 0 (0 = no cap)")
    if len(feats) < 2:
        raise DataError(f"need at least 2 training examples, got {len(feats)}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # DP randomness (Poisson sampling and noise) comes from fresh OS entropy, never from the configured seed:
    # anyone who knows a seed could replay the sampling and subtract the noise. Only non-private training
    # is reproducible from ``seed``. (Opacus's secure_mode with torchcsprng is the cryptographic option.)
    torch.manual_seed(seed if plan is None else secrets.randbits(63))
    model.train()
    feats = feats.to(device_of(model))
    opt = _optimizer(model, cfg)
    losses = get_task(cfg).losses
    start = time.perf_counter()
    if plan is None:
        loss, steps = _train_plain(model, feats, opt, losses, cfg.train.batch_size, epochs, physical_batch)
        return TrainOutcome(loss, steps, list(history), time.perf_counter() - start)
    loss, steps, new_history = _train_dp(
        model, feats, opt, losses, cfg, epochs, plan, history, physical_batch
    )
    return TrainOutcome(loss, steps, new_history, time.perf_counter() - start)


def _slices(idx: torch.Tensor, physical_batch: int) -> tuple[torch.Tensor, ...]:
    """``idx`` in slices of at most ``physical_batch`` (one slice when there is no cap)."""
    if physical_batch <= 0 or len(idx) <= physical_batch:
        return (idx,)
    return tuple(idx.split(physical_batch))


def _train_plain(
    model: nn.Module,
    feats: Features,
    opt: torch.optim.Optimizer,
    losses: Losses,
    batch: int,
    epochs: int,
    physical_batch: int = 0,
) -> tuple[float, int]:
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in torch.randperm(len(feats)).split(batch):
            opt.zero_grad(set_to_none=True)
            value = 0.0
            for part in _slices(idx, physical_batch):
                h, m, y = feats.batch(part)
                loss = losses(model, h, m, y).sum() / len(idx)
                loss.backward()
                value += loss.item()
            opt.step()
            total, steps = total + value, steps + 1
    return total / max(steps, 1), steps


def _train_dp(
    model: nn.Module,
    feats: Features,
    opt: torch.optim.Optimizer,
    losses: Losses,
    cfg: Config,
    epochs: int,
    plan: DPPlan,
    history: History,
    physical_batch: int = 0,
) -> tuple[float, int, History]:
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=cfg.dp.accountant)
    engine.accountant.history = list(history)
    loader = DataLoader(TensorDataset(torch.arange(len(feats))), batch_size=cfg.train.batch_size)
    expected_q = sample_rate(len(feats), cfg.train.batch_size)
    if abs(expected_q - plan.sample_rate) > 1e-12:
        raise DataError(f"sample rate {plan.sample_rate} planned but the data gives {expected_q}")
    ghost = cfg.dp.grad_sample_mode == "ghost"  # the config allows it for the classifier, flat clipping only
    kwargs: dict[str, Any] = {"criterion": nn.CrossEntropyLoss(reduction="mean")} if ghost else {}
    max_grad_norm: float | list[float] = cfg.dp.max_grad_norm
    if cfg.dp.clipping == "per-tensor":
        # Each trainable tensor is clipped on its own to C/√k: the total sensitivity stays C (σ unchanged),
        # but small-gradient tensors (LoRA) are no longer drowned by the head's larger gradient.
        k = sum(1 for p in model.parameters() if p.requires_grad)
        max_grad_norm = [cfg.dp.max_grad_norm / math.sqrt(k)] * k
        kwargs["clipping"] = "per_layer"
    private = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=plan.sigma,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=cfg.dp.grad_sample_mode,
        loss_reduction="mean" if ghost else "sum",
        **kwargs,
    )
    if ghost:
        dp_model, dp_opt, criterion, dp_loader = private
    else:
        dp_model, dp_opt, dp_loader = private
        # Per-sample gradients of a SUM loss are the true per-example gradients, also for an empty
        # Poisson batch; the optimizer then averages (Σ clipped + noise) over the expected batch size.
        dp_opt.loss_reduction = "mean"
    total, steps = 0.0, 0
    try:
        for _ in range(epochs):
            for (idx,) in dp_loader:
                dp_opt.zero_grad(set_to_none=True)
                if len(idx) == 0:  # an empty Poisson batch is still a step: noise only, accounted
                    _empty_step(dp_opt, ghost)
                    steps += 1
                    continue
                if ghost:
                    # the cap is the device's (fedpers agent --max-physical-batch), not the run config's
                    if physical_batch and len(idx) > physical_batch:
                        raise ConfigError("a physical batch cap needs dp.grad-sample-mode hooks or functorch")
                    h, m, y = feats.batch(idx)
                    loss = criterion(dp_model(h, m), y)
                    loss.backward()
                    value = float(loss.item())
                else:
                    # each slice's per-example gradients are clipped and summed (Opacus' skipped step,
                    # as in its BatchMemoryManager); noise, scaling and accounting happen once, at the
                    # last slice: the same mechanism as one pass over the whole logical batch
                    value = 0.0
                    parts = _slices(idx, physical_batch)
                    for j, part in enumerate(parts):
                        h, m, y = feats.batch(part)
                        loss = losses(dp_model, h, m, y).sum()
                        loss.backward()
                        value += loss.item()
                        if j < len(parts) - 1:
                            dp_opt.signal_skip_step(do_skip=True)
                            dp_opt.step()
                            dp_opt.zero_grad(set_to_none=True)
                    value /= max(len(idx), 1)
                dp_opt.step()
                total, steps = total + value, steps + 1
    finally:
        if hasattr(dp_model, "_close"):
            dp_model._close()
    if unwrap(dp_model) is not model:
        raise RuntimeError("Opacus returned a different module than it was given")
    return total / max(steps, 1), steps, [tuple(e) for e in engine.accountant.history]  # type: ignore[misc]


def _empty_step(optimizer: torch.optim.Optimizer, ghost: bool) -> None:
    """Take a DP step on an empty batch: zero per-sample gradients, then Opacus adds the noise."""
    for p in optimizer.params:  # type: ignore[attr-defined]
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
