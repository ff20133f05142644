"""Scale benchmark: a growing population with a fixed cohort (20 clients per round) on Flower's engine.

For each population size a fresh process runs the real federation (sample-level DP, encrypted client
state, ledger, checkpoints) on tweets split over that many users, sampling ``cohort`` clients per round
for training and evaluation. Reported: wall seconds per round (first and steady), the peak resident
memory of the whole process tree (the driver, Ray and its actors; sampled every 0.25 s), and the
on-disk personal state per user that took part.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from simulations.bench.fresh_process import call_fresh

WORKLOAD: dict[str, Any] = {
    "task.dataset": "tweets",
    "task.dirichlet-alpha": 1.0,  # α = 0.3 cannot give 300+ users ≥ 3 tweets each (flwr-datasets gives up)
    "task.train-size": 40,
    "task.test-size": 20,
    "fed.num-rounds": 3,
    "dp.enabled": True,
    "dp.epsilon": 8.0,
    "personalization.mode": "fedper",
    "client.report-before-after": False,
}
POPULATIONS = (50, 150, 300, 600)
TARGET_RSS_GIB, TARGET_STATE_BYTES = 4.0, 1_000_000


class TreeRSS:
    """Samples the summed RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self._root = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def state_sizes(clients_dir: Path) -> list[int]:
    """Bytes on disk per client folder that holds a saved state."""
    sizes = []
    for folder in sorted(clients_dir.glob("client-*")):
        files = [f for f in folder.iterdir() if f.is_file()]
        if any(f.name.endswith(".state") for f in files):
            sizes.append(sum(f.stat().st_size for f in files))
    return sizes


def _child(
    population: int, cohort: int, out: str | Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one population in this process."""
    out = Path(out)
    from simulations.run import SimSettings, simulate

    frac = min(1.0, cohort / population)
    over = {
        **WORKLOAD,
        **(extra or {}),
        "fed.fraction-train": frac,
        "fed.fraction-evaluate": frac,
        "fed.min-clients": min(cohort, population),
        "train.threads": 1,
    }
    ends: list[float] = []
    start = time.time()
    with TreeRSS() as rss:
        simulate(SimSettings(num_clients=population, client_cpus=1.0, overrides=over), out,
                 on_round=lambda _line: ends.append(time.time()))  # fmt: skip
    rounds = [ends[0] - start] + [b - a for a, b in zip(ends, ends[1:], strict=False)]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    accepted = [int(ln.get("accepted", 0)) for ln in lines]
    if not accepted or min(accepted) == 0:
        reasons = [r for ln in lines for r in ln.get("refusals", [])][:1]
        raise RuntimeError(
            f"population {population}: a round trained no client (accepted {accepted}); {reasons}"
        )
    sizes = state_sizes(out / "clients")
    return {
        "population": population,
        "cohort": cohort,
        "round-seconds": rounds,
        "steady-round-seconds": sorted(rounds[1:])[len(rounds[1:]) // 2] if len(rounds) > 1 else rounds[0],
        "peak-rss-gib": rss.peak / 2**30,
        "accepted-per-round": accepted,
        "users-with-state": len(sizes),
        "state-bytes-mean": sum(sizes) / len(sizes) if sizes else 0.0,
        "state-bytes-max": max(sizes) if sizes else 0,
        "wall-seconds": time.time() - start,
    }


def run_population(
    population: int, cohort: int, out: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`_child` in a fresh Python process (so memory is measured per population)."""
    return call_fresh(
        "simulations.bench.scale", "_child", population, cohort, str(out), extra or {},
        what=f"population {population}",
    )  # fmt: skip


def scale_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table and target verdicts."""
    from simulations.bench.output import markdown_table

    body = markdown_table(
        ("population", "per round", "round 1 s", "steady round s", "peak RSS GiB", "users with state",
         "state / user KiB"),
        [
            (r["population"], r["cohort"], f"{r['round-seconds'][0]:.1f}", f"{r['steady-round-seconds']:.1f}",
             f"{r['peak-rss-gib']:.2f}", r["users-with-state"], f"{r['state-bytes-max'] / 1024:.1f}")
            for r in rows
        ],
    )  # fmt: skip
    if not rows:
        return body
    peaks = [r["peak-rss-gib"] for r in rows]
    growth = peaks[-1] / peaks[0] if peaks[0] else float("nan")
    worst_state = max(r["state-bytes-max"] for r in rows)
    lines = [
        body,
        f"- peak RSS {min(peaks):.2f}–{max(peaks):.2f} GiB (×{growth:.2f} from population "
        f"{rows[0]['population']} to {rows[-1]['population']}; target ≤ {TARGET_RSS_GIB} GiB: "
        f"{'met' if max(peaks) <= TARGET_RSS_GIB else 'MISSED'})",
        f"- largest state per user {worst_state / 1024:.1f} KiB (target ≤ 1 MB: "
        f"{'met' if worst_state <= TARGET_STATE_BYTES else 'MISSED'})",
    ]
    return "\n".join(lines) + "\n"
