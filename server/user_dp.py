"""User-level DP on the server: clip each client's shared update, average uniformly, add Gaussian noise.

The release each round is ``current + (Σᵢ clip(Δᵢ, S) + N(0, (z_Δ·S)²·I)) / m`` where m is the expected
cohort under Poisson sampling (q·N), or the number of clients asked under ``dp.user-sampling = "none"``
(a fixed denominator either way, so one user changes the sum by at most S whatever the others send),
with fixed S or S adapted towards a target quantile of update norms (Andrew et al. 2021, server-side:
the noisy count of unclipped updates costs privacy too, so the update noise z_Δ is raised such that the
composed mechanism has noise multiplier z). The noise parameters come from Flower's
helpers (``flwr.supercore.differential_privacy``); the noise from a generator seeded by OS entropy.
With z = 0 only clipping happens and ε is infinite. Flower's strategy wrappers are not used as such: they clip
before fedpers validates a reply (a malformed reply would be clipped, not rejected), average with the
``num-examples`` weights (sensitivity then depends on the weights), and their accountant requires an
unmodified ``FedAvg.aggregate_train``.

Accounting: one Poisson-subsampled Gaussian step per round with q = ``fed.fraction-train`` and noise
multiplier z, composed over rounds by the same accountant as the clients; neighbouring = one user's whole
data added or removed. The accounting is the sampling that runs: with user-level DP and q < 1 the
strategy (server.strategy) asks each connected node independently with probability q, drawn from OS
entropy, and releases every round, even when nobody was drawn (noise only). ``dp.user-sampling =
"none"`` keeps Flower's fixed-size cohort and accounts with q = 1 (no amplification, conservative).

Deployment-scale accounting (``dp.user-virtual-cohort`` C, ``dp.user-virtual-population`` N_v; the
convention of pfl-research's benchmarks): the noise on the mean is z·S/C instead of z·S/m, and ε is
composed with q = C/N_v and δ for N_v. It says what the same model would get from a deployment that
samples C of N_v users per round; it is **not** a guarantee for the users actually simulated (their
updates get far less noise than their own cohort and population would need). Every such release says
``user-virtual-cohort`` in the ledger and the reports.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv

from common.config import Config
from common.errors import ConfigError
from common.privacy import USER_DELTA, History, calibrate_sigma, check_delta, compose, default_delta, epsilon


@dataclass
class UserLevelDP:
    """Clipping, noise and accounting of the user-level mechanism (state persists across rounds)."""

    noise_multiplier: float
    clipping_norm: float
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0  # 0 = max(m / 20 (Andrew et al.), z): small cohorts need more count noise
    accountant: str = "prv"
    sampling: str = "poisson"
    delta: float = 0.0  # 0 = min(1e-6, 0.1 / population)
    budget: float = 0.0  # 0 = report only
    virtual_cohort: int = 0  # deployment-scale accounting: noise for C of ...
    virtual_population: int = 0  # ... N_v users (0 = off)
    history: History = field(default_factory=list)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(secrets.randbits(128)))
    _last: tuple[tuple[tuple[float, float, int], ...], float, float] | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> UserLevelDP:
        """The mechanism ``cfg.dp`` asks for (``dp.user-level`` must be on)."""
        d = cfg.dp
        return cls(
            noise_multiplier=d.user_noise_multiplier,
            clipping_norm=d.user_clipping_norm,
            adaptive=d.user_clipping == "adaptive",
            target_quantile=d.user_target_quantile,
            clip_lr=d.user_clip_lr,
            count_stddev=d.user_count_stddev,
            accountant=d.accountant,
            sampling=d.user_sampling,
            delta=d.user_delta,
            budget=d.user_epsilon,
            virtual_cohort=d.user_virtual_cohort,
            virtual_population=d.user_virtual_population,
        )

    def sample_rate(self, cohort: float, population: int) -> float:
        """q used for accounting this round (C / N_v under deployment-scale accounting)."""
        if self.virtual_cohort:
            return self.virtual_cohort / self.virtual_population
        return 1.0 if self.sampling == "none" else min(1.0, cohort / max(population, 1))

    def delta_for(self, population: int) -> float:
        """δ of the user-level guarantee: ``dp.user-delta`` (below 1/population), or min(1e-6, 0.1/N).

        Under deployment-scale accounting the population is the virtual one."""
        population = self.virtual_population or population
        if self.delta <= 0:
            return default_delta(population, USER_DELTA)
        try:
            return check_delta(self.delta, population, "dp.user-delta; N = the population")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def calibrate(self, cohort: float, population: int, rounds: int) -> float:
        """Set z so that ``rounds`` more releases at this cohort and population end within the budget.

        What ``dp.user-noise-multiplier = 0`` with a ``dp.user-epsilon`` budget asks for; the history so far
        (a resumed federation) counts. Raises PrivacyBudgetExhausted when no z fits.
        """
        self.noise_multiplier = calibrate_sigma(
            budget=self.budget,
            delta=self.delta_for(population),
            sample_rate=self.sample_rate(cohort, population),
            steps=rounds,
            history=self.history,
            accountant=self.accountant,
        )
        return self.noise_multiplier

    def epsilon_after(self, cohort: float, population: int) -> float:
        """ε if one more round with this cohort and population were released."""
        q = self.sample_rate(cohort, population)
        return self._epsilon(compose(self.history, self.noise_multiplier, q, 1), self.delta_for(population))

    def _epsilon(self, history: History, delta: float) -> float:
        """ε of ``history``; the last answer is kept (the budget check and the release ask the same)."""
        key = tuple((float(s), float(q), int(n)) for s, q, n in history)
        if self._last is not None and self._last[:2] == (key, delta):
            return self._last[2]
        value = float("inf") if any(s <= 0 for s, _, _ in key) else epsilon(history, delta, self.accountant)
        self._last = (key, delta, value)
        return value

    def release(
        self,
        current: Mapping[str, np.ndarray],
        replies: Sequence[Mapping[str, np.ndarray]],
        cohort: float,
        population: int,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The noisy aggregate of ``replies`` (already validated) and what happened, for the ledger.

        ``cohort`` is the fixed denominator: the expected cohort q·N under Poisson sampling (a round may
        have more or fewer replies, or none), else the number of clients asked (≥ the replies).
        """
        if not cohort > 0 or (self.sampling == "none" and cohort < len(replies)):
            raise ValueError(f"cohort {cohort} must be > 0 (and ≥ the {len(replies)} replies when fixed)")
        names = sorted(current)
        clip = self.clipping_norm
        total = [np.zeros_like(current[n], dtype=np.float64) for n in names]
        unclipped = 0
        for reply in replies:
            update = [reply[n].astype(np.float64) - current[n] for n in names]
            norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
            if norm <= clip:
                unclipped += 1
            else:  # flat clipping to norm S (Flower's helper divides by zero for a zero update)
                update = [u * (clip / norm) for u in update]
            for acc, u in zip(total, update, strict=True):
                acc += u
        z_update = self.noise_multiplier
        count_std = 0.0
        if self.adaptive and self.noise_multiplier > 0:
            count_std, z_update = compute_adaptive_noise_params(
                self.noise_multiplier, cohort, self.count_stddev or max(cohort / 20, self.noise_multiplier)
            )
        noise_cohort = self.virtual_cohort or cohort  # deployment-scale: the noise of a mean over C users
        std = compute_stdv(z_update, clip, noise_cohort)  # type: ignore[arg-type]  # per coordinate, on the mean
        new = {
            n: (current[n] + acc / cohort + self.rng.normal(0.0, std, acc.shape)).astype(np.float32)
            for n, acc in zip(names, total, strict=True)
        }
        if self.adaptive:
            noisy = (unclipped + self.rng.normal(0.0, count_std)) / cohort
            self.clipping_norm = clip * float(np.exp(-self.clip_lr * (noisy - self.target_quantile)))
        q = self.sample_rate(cohort, population)
        self.history = compose(self.history, self.noise_multiplier, q, 1)
        delta = self.delta_for(population)
        info = {
            "user-noise-multiplier": self.noise_multiplier,
            "user-update-noise-multiplier": z_update,
            "user-clipping-norm": clip,
            "user-next-clipping-norm": self.clipping_norm,
            "user-unclipped-fraction": unclipped / max(len(replies), 1),
            "user-noise-std": std,
            "user-sample-rate": q,
            "user-cohort": cohort,
            "user-replies": len(replies),
            "user-population": self.virtual_population or population,
            "user-delta": delta,
            "user-epsilon": self._epsilon(self.history, delta),
        }
        if self.virtual_cohort:  # not a guarantee for the simulated users: said wherever ε is
            info.update({"user-virtual-cohort": self.virtual_cohort, "user-simulated-population": population})
        return new, info
