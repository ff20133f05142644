"""Which users of a bring-your-own file become clients (``task.dataset`` = "file" / "text-file").

The rule, the same on every node and in the simulation runner: users with fewer than
``task.min-examples`` rows are left out; the rest are ordered largest first (ties by name) and the first
``task.max-users`` are kept (0 = all). Client ``p`` is the ``p``-th kept user, so with fewer clients than
kept users a simulation takes the largest ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from common.config import TaskConfig


@dataclass(frozen=True)
class UserSelection:
    """The kept users in client order, their row counts, and those left out (by reason)."""

    kept: tuple[str, ...]
    rows: dict[str, int]
    too_small: tuple[str, ...]  # fewer rows than task.min-examples
    over_max: tuple[str, ...]  # beyond task.max-users

    def describe(self, num_clients: int) -> str:
        """One line: which users a run of ``num_clients`` clients takes, and who is left out and why."""
        taken = self.kept[:num_clients]
        shown = ", ".join(f"{u} ({self.rows[u]})" for u in taken[:8]) + (" …" if len(taken) > 8 else "")
        out = [f"{len(taken)} of {len(self.rows)} users taken, largest first: {shown}"]
        if self.too_small:
            out.append(f"{len(self.too_small)} with fewer than task.min-examples rows left out")
        if self.over_max:
            out.append(f"{len(self.over_max)} beyond task.max-users left out")
        if len(self.kept) > num_clients:
            out.append(f"{len(self.kept) - num_clients} beyond num-clients = {num_clients} left out")
        return "; ".join(out)


def select_users(users: Sequence[str], task: TaskConfig) -> UserSelection:
    """Apply ``task.min-examples`` and ``task.max-users`` to the user column ``users`` (one entry a row)."""
    rows = dict(Counter(users))
    ordered = sorted(rows, key=lambda u: (-rows[u], u))
    big = [u for u in ordered if rows[u] >= task.min_examples]
    small = tuple(u for u in ordered if rows[u] < task.min_examples)
    cap = task.max_users or len(big)
    return UserSelection(tuple(big[:cap]), rows, small, tuple(big[cap:]))
