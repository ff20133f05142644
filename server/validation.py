"""Validation of client replies before aggregation: nothing unexpected may enter the global model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import protocol as P
from common.errors import ParameterError
from common.params import check_arrays


class PrivacyViolation(ParameterError):
    """A reply carried a tensor that must never leave a client (a personal parameter)."""


def validate_reply(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    *,
    expected: Mapping[str, tuple[int, ...]],
    personal: set[str],
    current: Mapping[str, np.ndarray],
    max_update_norm: float,
) -> float:
    """Raise unless the reply is well-formed; return the L2 norm of its update (reply − current).

    Checks, in order: no personal key (a privacy violation), exact key set, shapes, float dtype, finite
    values, a positive ``num-examples``, and ``‖update‖ ≤ max_update_norm`` (0 disables the bound).
    """
    leaked = sorted(set(arrays) & personal)
    if leaked:
        raise PrivacyViolation(f"reply carries personal tensors {leaked[:3]}{'…' if len(leaked) > 3 else ''}")
    check_arrays(arrays, expected, what="reply")
    n = metrics.get(P.NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
        raise ParameterError(f"reply has no positive '{P.NUM_EXAMPLES}' metric (got {n!r})")
    norm = float(
        np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - current[k]) ** 2)) for k in arrays))
    )
    if max_update_norm > 0 and norm > max_update_norm:
        raise ParameterError(f"update norm {norm:.3g} exceeds fed.max-update-norm {max_update_norm:.3g}")
    return norm


def weighted_average(
    replies: Sequence[tuple[Mapping[str, np.ndarray], float]], names: list[str]
) -> dict[str, np.ndarray]:
    """Σ wᵢ·xᵢ / Σ wᵢ per tensor, in float64, returned as float32."""
    total = sum(w for _, w in replies)
    out = {}
    for name in names:
        acc = np.zeros_like(replies[0][0][name], dtype=np.float64)
        for arrays, w in replies:
            acc += arrays[name].astype(np.float64) * (w / total)
        out[name] = acc.astype(np.float32)
    return out
