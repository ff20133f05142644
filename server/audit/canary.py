"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, 2023), white-box.

The auditor adds m gradient canaries to one client's DP-SGD: canary i is a per-example gradient of norm
exactly C (the clipping norm) on its own coordinate of the trainable tensors, and it is in the data set
independently with probability ½. Training then runs the client's real mechanism: Opacus's DP optimizer
(Poisson sampling at rate q, per-example clipping to C, Gaussian noise σC) with σ calibrated by fedpers
for the claimed ε at δ, next to the real examples. The auditor sees every privatized gradient (white
box) and scores canary i by the sum over steps of its coordinate, a coordinate no real example's
gradient touches (LoRA A while B = 0; the learning rate is 0, so the model stays there). It guesses
"in" for the k highest scores and "out" for the k lowest; with v correct out of r = 2k guesses, ε_lb
is the largest ε for which an (ε, δ)-DP algorithm would give ≥ v correct guesses with probability
below 5 % (the paper's theorem: a binomial tail plus a δ term). Soundness: ε_lb ≤ ε for a correct
implementation; with DP off the same audit shows the leak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of ≥ v correct of r guesses on m canaries under (ε, δ)-DP (one-run audit theorem)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    acc = 1.0 / (1.0 + math.exp(-eps))  # best accuracy of a guess against ε-DP
    tail = float(stats.binom.sf(v - 1, r, acc))
    worst, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += float(stats.binom.pmf(v - i, r, acc))
        worst = max(worst, window / i)
    return min(1.0, tail + 2.0 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest ε rejected at ``confidence`` (bisection; 0 when nothing can be rejected)."""
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 100:
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """All parameters' gradients as one vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


@dataclass(frozen=True)
class AuditSetup:
    """What the audit trains and claims."""

    canaries: int = 10000
    guesses: int = 250  # k "in" and k "out" guesses, fixed before training
    epsilon: float = 4.0
    delta: float = 1e-5
    sample_rate: float = 0.1
    steps: int = 200
    max_grad_norm: float = 1.0
    dp: bool = True
    seed: int = 0


def run_canary_audit(setup: AuditSetup, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train once with canaries (on a real model and a real client's data); return the audit result."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.config import Config
    from common.privacy import calibrate_sigma
    from common.tasks import get_task

    if setup.guesses * 2 > setup.canaries:
        raise ValueError(f"2 × guesses ({2 * setup.guesses}) cannot exceed the canaries ({setup.canaries})")
    cfg = Config.from_run_config(overrides or {})
    task = get_task(cfg)
    backbone = task.backbone()
    feats = task.features(backbone, task.load(0, 1), "train")
    model = backbone.new_model()
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    # Canaries sit on coordinates no real example's gradient touches (LoRA A while B = 0 and the model
    # stays at its initialisation), so the scores compare canary signal with DP noise alone.
    h, mask, y = feats.batch(slice(0, len(feats)))
    F.cross_entropy(model(h, mask), y, reduction="sum").backward()
    free = np.flatnonzero(_flat_grad(params).abs().numpy() == 0)
    model.zero_grad(set_to_none=True)
    if len(free) < setup.canaries:
        raise ValueError(
            f"{setup.canaries} canaries need as many coordinates no real gradient touches; "
            f"the model has {len(free)}"
        )
    rng = np.random.default_rng(setup.seed)
    coords = rng.choice(free, size=setup.canaries, replace=False)
    included = rng.random(setup.canaries) < 0.5
    sigma = (
        calibrate_sigma(budget=setup.epsilon, delta=setup.delta, sample_rate=setup.sample_rate,
                        steps=setup.steps, history=[], accountant="prv")
        if setup.dp else 0.0
    )  # fmt: skip
    clip = setup.max_grad_norm if setup.dp else 1e12  # no clipping without DP
    opt = torch.optim.SGD(params, lr=0.0)  # the auditor reads gradients; the model need not move
    batch = max(1, round(setup.sample_rate * len(feats)))
    loader = DataLoader(TensorDataset(torch.arange(len(feats))), batch_size=batch)
    engine = PrivacyEngine(accountant="prv")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=clip, poisson_sampling=True, loss_reduction="sum",
    )  # fmt: skip
    dp_opt.loss_reduction = "mean"
    torch.manual_seed(setup.seed + 1)
    scores = np.zeros(setup.canaries)
    offsets = np.cumsum([0, *sizes])
    steps = 0
    while steps < setup.steps:
        for (idx,) in dp_loader:
            if steps >= setup.steps:
                break
            dp_opt.zero_grad(set_to_none=True)
            if len(idx):
                h, m, y = feats.batch(idx)
                F.cross_entropy(dp_model(h, m), y, reduction="sum").backward()
            sampled = np.flatnonzero(included & (rng.random(setup.canaries) < setup.sample_rate))
            where = coords[sampled]
            for p_i, p in enumerate(params):
                rows = torch.zeros((len(sampled), p.numel()))
                mine = np.flatnonzero((where >= offsets[p_i]) & (where < offsets[p_i + 1]))
                rows[torch.from_numpy(mine), torch.from_numpy(where[mine] - offsets[p_i])] = (
                    setup.max_grad_norm
                )
                rows = rows.view(len(sampled), *p.shape)  # each canary row has norm exactly C
                gs = getattr(p, "grad_sample", None)
                base = gs if gs is not None else torch.zeros((0, *p.shape))
                p.grad_sample = torch.cat([base, rows])  # type: ignore[attr-defined]
            dp_opt.step()
            grad = _flat_grad(params).detach().numpy()
            scores += grad[coords]
            steps += 1
    k = setup.guesses
    order = np.argsort(scores)
    correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
    eps_lb = epsilon_lower_bound(setup.canaries, 2 * k, correct, setup.delta)
    return {
        "dp": setup.dp, "epsilon-claimed": setup.epsilon if setup.dp else None,
        "delta": setup.delta, "sigma": sigma, "sample-rate": setup.sample_rate, "steps": steps,
        "canaries": setup.canaries, "included": int(included.sum()), "guesses": 2 * k,
        "correct": correct, "epsilon-lower-bound": eps_lb, "confidence": 0.95,
        "real-examples": len(feats), "model": cfg.model.name,
        "score-mean-in": float(scores[included].mean()), "score-mean-out": float(scores[~included].mean()),
        "score-sd-out": float(scores[~included].std()),
    }  # fmt: skip
