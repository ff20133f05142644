"""Scale benchmark pieces: process-tree memory sampling and on-disk state per user."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from client.state import PersonalState, StateStore
from simulations.bench.scale import TreeRSS, scale_table, state_sizes


def test_tree_rss_counts_child_processes() -> None:
    with TreeRSS(interval=0.05) as alone:
        time.sleep(0.3)
    code = "b = bytearray(300 * 2**20); import time; time.sleep(1.5)"
    with TreeRSS(interval=0.05) as with_child:
        proc = subprocess.Popen([sys.executable, "-c", code])
        proc.wait()
    assert with_child.peak - alone.peak > 250 * 2**20


def test_state_sizes_counts_only_users_with_a_saved_state(tmp_path: Path) -> None:
    StateStore(tmp_path / "client-0000").save(PersonalState())
    (tmp_path / "client-0001").mkdir()  # never trained
    sizes = state_sizes(tmp_path)
    assert len(sizes) == 1 and 0 < sizes[0] < 10_000
    rows = [{"population": 50, "cohort": 20, "round-seconds": [9.0, 3.0], "steady-round-seconds": 3.0,
             "peak-rss-gib": 2.0, "users-with-state": 40, "state-bytes-max": sizes[0]}]  # fmt: skip
    assert "target ≤ 4.0 GiB: met" in scale_table(rows)
