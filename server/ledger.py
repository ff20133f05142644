"""The server's privacy ledger: per client, per round, what each client reports it spent.

Entries hold the client's own accountant numbers (ε, δ, σ, q, steps) exactly as reported, so an auditor
can recompute ε from (σ, q, steps) with an independent accountant. Refusals are recorded with reasons.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import protocol as P
from common.config import Config
from common.fileio import write_json_atomic


def ledger_meta(cfg: Config) -> dict[str, Any]:
    """What an auditor needs to read the entries: budget, accountant, δ rule, neighbouring relation."""
    return {
        "delta_rule": "min(1e-5, 0.1/n_train) per client (or the device's own δ)"
        if not cfg.dp.delta
        else cfg.dp.delta,
        "user_delta_rule": "min(1e-6, 0.1/population)" if not cfg.dp.user_delta else cfg.dp.user_delta,
        "device_caps": "each device refuses a run asking for more than its own ε cap and δ",
        "accountant": cfg.dp.accountant,
        "budget": cfg.dp.epsilon,
        "dp": cfg.dp.enabled,
        "neighbouring": "add/remove one example (sample-level)",
        "sampling": "Poisson",
        "user_level": cfg.dp.user_level,
        "user_neighbouring": "add/remove one user's whole data (user-level)",
        "user_sampling": cfg.dp.user_sampling,
        "user_budget": cfg.dp.user_epsilon,
    }


class StateRollback(ValueError):
    """A device's privacy history went backwards."""


class Ledger:
    """Append-only list of privacy entries, saved atomically as ``ledger.json``."""

    def __init__(self, path: str | Path, meta: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = dict(meta or {})
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.entries = list(data.get("entries", []))
            self.meta = {**data.get("meta", {}), **self.meta}
        self._steps: dict[int, int] = {}  # each client's highest step count accepted so far (rollback check)
        for e in self.entries:
            self._count(e)

    def _count(self, entry: Mapping[str, Any]) -> None:
        if "client" in entry and P.TOTAL_STEPS in entry and entry.get("status") != "rejected":
            client = int(entry["client"])
            self._steps[client] = max(self._steps.get(client, 0), int(entry[P.TOTAL_STEPS]))

    def record(
        self,
        server_round: int,
        node_id: int,
        status: str,
        metrics: Mapping[str, Any],
        reason: str = "",
        client: int | None = None,
    ) -> None:
        """Add one client's report for a round (status: accepted, rejected, refused, finetune).

        ``client`` is the device's identity (its node id in a deployment); without it, the partition id
        the client reported (the plain-loop simulation, where partition = device).
        """
        entry: dict[str, Any] = {"round": server_round, "node_id": node_id, "status": status}
        if client is not None:
            entry["client"] = int(client)
        elif P.PARTITION_ID in metrics:
            entry["client"] = int(metrics[P.PARTITION_ID])
        for key in P.PRIVACY_KEYS:
            if key in metrics:
                entry[key] = metrics[key]
        if reason:
            entry["reason"] = reason
        self.entries.append(entry)
        self._count(entry)

    def check_no_rollback(self, client: int, metrics: Mapping[str, Any]) -> None:
        """Raise StateRollback if ``client`` reports fewer DP steps in all than it reported before.

        A device's step count only grows; fewer steps mean its state file was replaced by an older copy
        and it is about to spend budget it already spent.
        """
        if P.TOTAL_STEPS not in metrics:
            return
        now, before = int(metrics[P.TOTAL_STEPS]), self._steps.get(client, 0)
        if now < before:
            raise StateRollback(
                f"state rolled back: the client reports {now} DP steps in all, fewer than the {before} it "
                "reported before (an older copy of its state file?); reply dropped"
            )

    def record_user_level(self, server_round: int, status: str, info: Mapping[str, Any]) -> None:
        """Add the server's user-level DP release (or refusal) of a round."""
        self.entries.append({"round": server_round, "scope": "user-level", "status": status, **info})

    def user_level_entries(self) -> list[dict[str, Any]]:
        """The user-level releases, oldest first (across every run that wrote to this ledger)."""
        return [e for e in self.entries if e.get("scope") == "user-level" and e.get("status") == "released"]

    def latest_by_client(self) -> dict[int, dict[str, Any]]:
        """The last entry carrying ε for each client."""
        out: dict[int, dict[str, Any]] = {}
        for e in self.entries:
            if "client" in e and P.EPSILON in e:
                out[int(e["client"])] = e
        return out

    def save(self) -> None:
        """Write the ledger atomically."""
        write_json_atomic(self.path, {"meta": self.meta, "entries": self.entries})
