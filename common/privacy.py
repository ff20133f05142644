"""Privacy accounting: one accountant history per client, ε over it, and σ calibration.

A history is Opacus's own representation: a list of ``(noise_multiplier, sample_rate, steps)``
entries, one per stretch of identical DP-SGD steps. Composition across rounds and runs is simply
appending to the same list, so ε after k rounds equals one accountant run over all k·steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

from opacus.accountants import create_accountant

from common.errors import ConfigError, PrivacyBudgetExhausted

Entry = tuple[float, float, int]
History = list[Entry]

SIGMA_MAX = 1e4
SAMPLE_DELTA = 1e-5  # default δ, sample level (or 0.1/n when that is smaller)
USER_DELTA = 1e-6  # default δ, user level (or 0.1/N when that is smaller)


def default_delta(count: int, cap: float) -> float:
    """The default δ for ``count`` neighbours-to-protect (examples or users): min(cap, 0.1 / count)."""
    return min(cap, 0.1 / max(count, 1))


def check_delta(delta: float, count: int, what: str) -> float:
    """``delta`` if it is a meaningful guarantee for ``count`` records, else ValueError.

    A δ ≥ 1/count is refused: a mechanism that publishes one random record verbatim is (0, 1/count)-DP.
    """
    if not 0 < delta < 1.0 / max(count, 1):
        raise ValueError(
            f"δ = {delta:g} is not below 1/{count} ({what}): at that δ, publishing one random record "
            f"verbatim would be 'private'; use δ ≤ {0.1 / max(count, 1):.1e} (0.1/{count}) or leave it at 0 "
            "for the default"
        )
    return delta


def normalize(history: Iterable[Sequence[float]]) -> History:
    """Validate and canonicalise a history read from disk or a message."""
    out: History = []
    for entry in history:
        if len(entry) != 3:
            raise ConfigError(f"accountant history entry {entry!r} is not (sigma, sample_rate, steps)")
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if not (sigma > 0 and 0 < q <= 1 and steps >= 0) or not math.isfinite(sigma):
            raise ConfigError(f"invalid accountant history entry {entry!r}")
        out.append((sigma, q, steps))
    return out


def compose(history: History, sigma: float, sample_rate: float, steps: int) -> History:
    """``history`` followed by ``steps`` more steps at (σ, q), merged as Opacus merges them."""
    out = list(history)
    if steps <= 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == sample_rate:
        out[-1] = (sigma, sample_rate, out[-1][2] + steps)
    else:
        out.append((sigma, sample_rate, steps))
    return out


def epsilon(history: History, delta: float, accountant: str) -> float:
    """ε at ``delta`` of a whole history under the ``rdp`` or ``prv`` accountant (0 when empty)."""
    hist = tuple(e for e in history if e[2] > 0)
    if not hist:
        return 0.0
    return max(0.0, _epsilon(hist, delta, accountant))  # PRV's numerical estimate can dip below 0


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[Entry, ...], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def calibrate_sigma(
    *,
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    history: History,
    accountant: str,
    tolerance: float = 0.005,
) -> float:
    """Smallest σ (within ``tolerance`` relative) so that history + ``steps`` at σ stays within budget.

    Results are memoised per process: clients with the same data size share one calibration.
    """
    return _calibrate(budget, delta, sample_rate, steps, tuple(history), accountant, tolerance)


@lru_cache(maxsize=256)
def _calibrate(
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    history_t: tuple[Entry, ...],
    accountant: str,
    tolerance: float,
) -> float:
    history = list(history_t)
    spent = epsilon(history, delta, accountant)
    if spent >= budget:
        raise PrivacyBudgetExhausted(
            f"privacy budget exhausted: ε={spent:.3f} ≥ budget {budget:.3f} (δ={delta:.2e}) before this run"
        )
    if steps <= 0:
        raise ConfigError("cannot calibrate σ for zero planned steps")

    def eps_at(sigma: float) -> float:
        return epsilon(compose(history, sigma, sample_rate, steps), delta, accountant)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > budget:
        lo, hi = hi, hi * 2
        if hi > SIGMA_MAX:
            raise PrivacyBudgetExhausted(
                f"no noise multiplier ≤ {SIGMA_MAX:g} keeps ε within {budget} for {steps} more steps "
                f"(already spent ε={spent:.3f}); lower the planned steps or raise dp.epsilon"
            )
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if eps_at(mid) > budget:
            lo = mid
        else:
            hi = mid
    return hi
