"""Audit a privacy ledger: recompute every client's ε from its recorded (σ, q, steps) history.

Three numbers per client at the client's δ: the ε the client reported (ours: Opacus PRV or RDP, as
configured), Google's ``dp-accounting`` RDP, and its PLD accountant (tight; shows how much smaller ε could
be stated). A client is **inconsistent** when its reported ε differs by more than 1 % from the
independent accountant of the same kind (PRV ↔ PLD, RDP ↔ RDP; and by more than 0.02 in absolute
terms, the PRV accountant's own error), or when the ledger holds fewer steps
than the client reports having taken (history missing, e.g. an earlier run's ledger), and **over budget**
when any ε exceeds the budget. Neighbouring relation: add/remove one example of the client's data;
Poisson sampling with rate q; Gaussian noise σ × clipping norm; δ = min(1e-5, 0.1/n_train) per client
unless fixed (ledgers written before that rule say "1/n_train per client").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import protocol as P
from common.errors import FedpersError

TOLERANCE = 0.01  # relative disagreement allowed between accountants of the same kind
ABS_TOLERANCE = 0.02  # ... and absolute, for small ε (Opacus's PRV accountant is accurate to ±0.01)


def _disagree(reported: float, reference: float) -> bool:
    return abs(reported - reference) > max(TOLERANCE * reference, ABS_TOLERANCE)


class AuditError(FedpersError):
    """The ledger cannot be audited (missing, unreadable, or without privacy entries)."""


@dataclass
class ClientAudit:
    """One client's audit result."""

    client: int
    delta: float
    steps: int
    reported_total_steps: int
    epsilon_reported: float
    epsilon_rdp: float
    epsilon_pld: float
    budget: float
    status: str = "ok"
    problems: list[str] = field(default_factory=list)
    epsilon_by_round: list[tuple[int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_ledger(path: str | Path) -> Path:
    """``path`` itself if it is a ledger file, else ``path/ledger.json``."""
    p = Path(path)
    candidate = p / "ledger.json" if p.is_dir() else p
    if not candidate.is_file():
        raise AuditError(f"no ledger at {candidate} (give a run folder or its ledger.json)")
    return candidate


def load_ledger(path: Path) -> dict[str, Any]:
    """The ledger's JSON, checked for the fields the audit needs."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"cannot read ledger {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise AuditError(f"{path} is not a fedpers ledger (no 'entries' list)")
    return data


def independent_epsilons(history: list[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    """(RDP ε, PLD ε) of a Poisson-subsampled Gaussian history, from Google's dp-accounting."""
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger().setLevel(
        max(logging.getLogger().level, logging.ERROR)
    )  # dp-accounting warns via root
    events = [
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), int(steps))
        for sigma, q, steps in history
    ]
    rdp, pld = RdpAccountant(), PLDAccountant(value_discretization_interval=1e-3)
    for ev in events:
        rdp.compose(ev)
        pld.compose(ev)
    return float(rdp.get_epsilon(delta)), float(pld.get_epsilon(delta))


def replace_one_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """PLD ε of a Poisson-subsampled Gaussian history when one participant's contribution is *changed*
    (replaced by any other within the clipping ball) instead of added or removed, from dp-accounting.

    For user-level DP this is the bound for any change confined to one user's data, e.g. one of their
    examples: add/remove-one-user ε does not cover that by itself (a replacement is a removal and an
    addition). Consecutive equal (σ, q) steps are composed as one event."""
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)
    groups: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if groups and groups[-1][:2] == (float(sigma), float(q)):
            groups[-1] = (groups[-1][0], groups[-1][1], groups[-1][2] + int(steps))
        else:
            groups.append((float(sigma), float(q), int(steps)))
    pld = PLDAccountant(dpa.NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-3)
    for sigma, q, steps in groups:
        pld.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), int(steps))
    return float(pld.get_epsilon(delta))


def _history(spent: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float, int]], list[str], int]:
    """The client's (σ, q, steps) history from its entries, notes on steps it completed, steps missing.

    A reply can be lost after the client trained (a SecAgg+ round that failed after its key exchange,
    a timeout): the next entry's cumulative step count is then ahead of the entries. When the entries on
    both sides of the gap share σ and q (one run's noise plan, which every step of that run uses), the
    missing steps are that (σ, q); otherwise they are counted as missing (an incomplete history).
    """
    history: list[tuple[float, float, int]] = []
    notes: list[str] = []
    counted = missing = 0
    for before, e in zip([None, *spent[:-1]], spent, strict=True):
        sigma, q, steps = float(e[P.SIGMA]), float(e[P.SAMPLE_RATE]), int(e[P.STEPS])
        gap = int(e.get(P.TOTAL_STEPS, counted + steps)) - counted - steps
        plan = (float(before[P.SIGMA]), float(before[P.SAMPLE_RATE])) if before is not None else None
        if gap > 0 and plan == (sigma, q):
            history.append((sigma, q, gap))
            notes.append(f"{gap} steps before round {e.get('round')} (a lost reply), at the run's σ and q")
        elif gap > 0:
            missing += gap
        counted += max(gap, 0) + steps
        history.append((sigma, q, steps))
    return history, notes, missing


def audit_client(
    client: int, entries: Sequence[Mapping[str, Any]], budget: float, accountant: str
) -> ClientAudit:
    """Recompute one client's ε from its ledger entries (in the order they were recorded)."""
    spent = [e for e in entries if P.SIGMA in e and P.STEPS in e and P.SAMPLE_RATE in e]
    if not spent:
        raise AuditError(f"client {client} has no privacy entries")
    history, notes, missing = _history(spent)
    delta = float(spent[-1][P.DELTA])
    reported = float(spent[-1][P.EPSILON])
    total = int(spent[-1].get(P.TOTAL_STEPS, sum(h[2] for h in history)))
    eps_rdp, eps_pld = independent_epsilons(history, delta)
    result = ClientAudit(
        client, delta, sum(h[2] for h in history), total, reported, eps_rdp, eps_pld, budget,
        epsilon_by_round=[(i + 1, float(e[P.EPSILON])) for i, e in enumerate(spent)],
    )  # fmt: skip
    result.notes = notes
    if missing > 0 or total > result.steps + missing:
        result.problems.append(
            f"history incomplete: the client reports {total} steps in all, this ledger holds {result.steps}"
        )
    reference = eps_rdp if accountant == "rdp" else eps_pld
    if _disagree(reported, reference):
        name = "RDP" if accountant == "rdp" else "PLD"
        result.problems.append(
            f"reported ε {reported:.4f} differs from dp-accounting {name} {reference:.4f} by "
            f"{100 * abs(reported - reference) / reference:.1f} % (> {100 * TOLERANCE:.0f} %)"
        )
    if len({float(e[P.DELTA]) for e in spent}) > 1:
        result.problems.append("δ changed between entries")
    rolled = [e for e in entries if str(e.get("reason", "")).startswith("state rolled back")]
    if rolled:  # the server dropped those replies, but the device did train them: its ε counts them
        rounds = ", ".join(str(e.get("round")) for e in rolled)
        result.problems.append(f"state rolled back (round {rounds}): the device spent budget twice")
    if result.problems:
        result.status = "inconsistent"
    # Over budget: the reported ε above it, or the independent one above it by more than the tolerance.
    if reported > budget * (1 + 1e-9) or reference > budget * (1 + TOLERANCE):
        result.status = "over budget" if not result.problems else "inconsistent, over budget"
        result.problems.append(f"ε {max(reported, reference):.4f} > budget {budget}")
    return result


def audit_user_level(entries: Sequence[Mapping[str, Any]], budget: float, accountant: str) -> ClientAudit:
    """Recompute the server's user-level ε: one subsampled Gaussian step per released round."""
    history = [(float(e["user-noise-multiplier"]), float(e["user-sample-rate"]), 1) for e in entries]
    delta = float(entries[-1]["user-delta"])
    reported = float(entries[-1]["user-epsilon"])
    eps_rdp, eps_pld = independent_epsilons(history, delta)
    result = ClientAudit(
        -1, delta, len(history), len(history), reported, eps_rdp, eps_pld, budget or float("inf"),
        epsilon_by_round=[(i + 1, float(e["user-epsilon"])) for i, e in enumerate(entries)],
    )  # fmt: skip
    within = replace_one_epsilon(history, delta)
    result.notes.append(
        f"a change confined to one user's data (e.g. one example): ε {within:.4f} at the same δ "
        "(replace-one, dp-accounting PLD)"
    )
    reference = eps_rdp if accountant == "rdp" else eps_pld
    if _disagree(reported, reference):
        result.problems.append(f"reported user-level ε {reported:.4f} differs from {reference:.4f}")
        result.status = "inconsistent"
    if budget > 0 and (reported > budget * (1 + 1e-9) or reference > budget * (1 + TOLERANCE)):
        result.problems.append(f"user-level ε {max(reported, reference):.4f} > budget {budget}")
        result.status = "over budget" if result.status == "ok" else "inconsistent, over budget"
    return result


def audit_ledger(path: str | Path, budget: float | None = None) -> dict[str, Any]:
    """Audit every client of a ledger; returns a JSON-ready report (``ok`` False on any problem)."""
    ledger_path = find_ledger(path)
    data = load_ledger(ledger_path)
    meta = data.get("meta", {})
    if budget is None:
        if "budget" not in meta:
            raise AuditError(f"{ledger_path} records no budget; pass one (--budget)")
        budget = float(meta["budget"])
    accountant = str(meta.get("accountant", "prv"))
    by_client: dict[int, list[dict[str, Any]]] = {}
    for e in data["entries"]:
        if "client" in e and P.SIGMA in e:
            by_client.setdefault(int(e["client"]), []).append(e)
    user = [e for e in data["entries"] if e.get("scope") == "user-level" and e.get("status") == "released"]
    if not by_client and not user:  # a cross-device run has only the server's user-level releases
        raise AuditError(f"{ledger_path} holds no privacy entries (was DP enabled?)")
    clients = [audit_client(c, es, budget, accountant) for c, es in sorted(by_client.items())]
    report: dict[str, Any] = {
        "ledger": str(ledger_path),
        "budget": budget,
        "accountant": accountant,
        "neighbouring": meta.get("neighbouring", "add/remove one example (sample-level)"),
        "sampling": meta.get("sampling", "Poisson"),
        "delta_rule": meta.get("delta_rule", "1/n_train per client"),
        "tolerance": TOLERANCE,
        "ok": all(c.status == "ok" for c in clients),
        "clients": [asdict(c) for c in clients],
    }
    if user:
        user_budget = float(meta.get("user_budget") or 0.0)
        result = audit_user_level(user, user_budget, accountant)
        report["user_level"] = asdict(result)
        report["user_neighbouring"] = meta.get("user_neighbouring", "add/remove one user's whole data")
        virtual = {int(e["user-virtual-cohort"]) for e in user if "user-virtual-cohort" in e}
        if virtual:  # the ε holds for a deployment of that size, not for the users the run simulated
            report["user_neighbouring"] += (
                f"; deployment-scale accounting (virtual cohort {max(virtual)} of "
                f"{user[-1]['user-population']}): NOT a guarantee for the users simulated"
            )
        report["ok"] = report["ok"] and result.status == "ok"
    return report
