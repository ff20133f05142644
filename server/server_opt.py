"""Server-side optimizer on the shared tensors (FedAvgM): a server learning rate and momentum.

Each round the server turns the aggregate of the replies into a pseudo-gradient ``d = avg − x`` and
takes ``v ← β·v + d`` then ``x ← x + η·v``. With ``η = 1`` and ``β = 0`` this is plain FedAvg (the
aggregate is adopted unchanged). It only post-processes what the clients released (their updates are
already DP), so it costs no privacy: no client's ε changes. Why it can help under DP: the aggregate of
m clients carries 1/√m of one client's noise, so the server can take a larger step on the shared
tensors than any client could take alone; momentum averages the noise of successive rounds further.
The velocity is saved with every checkpoint, so a resumed run continues the same trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.config import Config
from common.errors import ConfigError


class ServerOptimizer:
    """``x ← x + η·v``, ``v ← β·v + (avg − x)`` over the shared tensors; η=1, β=0 is FedAvg."""

    def __init__(
        self, lr: float = 1.0, momentum: float = 0.0, velocity: Mapping[str, np.ndarray] | None = None
    ) -> None:
        if not np.isfinite(lr) or lr <= 0:
            raise ConfigError(f"fed.server-lr must be a positive number, got {lr}")
        if not np.isfinite(momentum) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"fed.server-momentum must be in [0, 1), got {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.velocity: dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=np.float32) for k, v in (velocity or {}).items()
        }

    @classmethod
    def from_config(cls, cfg: Config, velocity: Mapping[str, np.ndarray] | None = None) -> ServerOptimizer:
        """The optimizer of ``fed.server-lr`` and ``fed.server-momentum`` (with a resumed velocity)."""
        return cls(cfg.fed.server_lr, cfg.fed.server_momentum, velocity)

    @property
    def is_fedavg(self) -> bool:
        """True when a step adopts the aggregate unchanged."""
        return self.lr == 1.0 and self.momentum == 0.0

    def step(
        self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The new shared tensors from the current ones and this round's aggregate."""
        if set(current) != set(aggregate):
            odd = sorted(set(current) ^ set(aggregate))[:3]
            raise ValueError(f"aggregate names differ from the current tensors: {odd}")
        if self.is_fedavg:
            return dict(aggregate)
        if self.velocity and set(self.velocity) != set(current):
            raise ConfigError("the saved server velocity does not match the shared tensors")
        new: dict[str, np.ndarray] = {}
        for k in sorted(current):
            x = np.asarray(current[k], dtype=np.float64)
            d = np.asarray(aggregate[k], dtype=np.float64) - x
            v = self.momentum * self.velocity[k].astype(np.float64) + d if k in self.velocity else d
            self.velocity[k] = v.astype(np.float32)
            new[k] = (x + self.lr * v).astype(np.float32)
        return new
