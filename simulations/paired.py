"""Paired per-client comparison of two modes run on the same clients: is a gap systematic?

Two modes of one comparison (``--compare``, or the cells of one setting and seed in the quality grid)
evaluate the very same clients on the very same test data, so their per-client scores can be paired.
For each client the difference of its score is taken (accuracy points for a classifier; for a causal LM
the log of the perplexity ratio, reported as a relative change). Resampling the *clients* with
replacement (a paired bootstrap, seeded) gives a 95 % interval for the difference of the mean and of the
10th and 90th percentiles, and the count of clients on each side says whether one or two users carry it.

What this interval covers: which users happened to be in the run. It does not cover the DP noise of the
training itself (fresh on every run by design); that spread needs reruns or more seeds.

``fedpers simulate --compare`` writes the table as ``paired.md`` next to ``compare.md``, with the first
mode as the base; ``python -m simulations.paired --run-dir RUN [--base fedper]`` prints it for any
finished compare folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from common import protocol as P
from simulations.bench.output import markdown_table

K = TypeVar("K", bound=Hashable)
RESAMPLES = 10_000
STATS = ("mean", "p10", "p90")


@dataclass(frozen=True)
class Paired:
    """``a`` against ``b`` over their common clients; every difference is a − b (see :func:`paired`)."""

    n: int
    better: int  # clients where a is better than b
    worse: int
    diff: dict[str, float]  # stat -> difference of that statistic between a and b
    low: dict[str, float]  # stat -> 2.5th percentile of the bootstrap differences
    high: dict[str, float]  # stat -> 97.5th percentile

    def significant(self, stat: str = "mean") -> bool:
        """Whether the 95 % interval of ``stat``'s difference excludes zero."""
        return self.low[stat] > 0 or self.high[stat] < 0


def _stat(values: np.ndarray, stat: str) -> np.ndarray:
    """``stat`` along the last axis (the percentiles as ``server.recorder.distribution`` takes them)."""
    if stat == "mean":
        return values.mean(axis=-1)
    return np.percentile(values, int(stat[1:]), axis=-1)


def paired(
    a: Mapping[K, float],
    b: Mapping[K, float],
    *,
    lower_is_better: bool,
    relative: bool = False,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Paired:
    """Compare per-client scores ``a`` and ``b`` (keyed by client) over the clients both have.

    With ``relative`` (perplexity) each statistic is compared as a ratio: the difference is
    ``stat(a) / stat(b) − 1`` (for the mean: the geometric mean of the per-client ratios − 1, i.e. the
    mean of the log ratios, which the bootstrap resamples); otherwise it is ``stat(a) − stat(b)``.
    """
    common = [k for k in a if k in b]
    if len(common) < 2:
        raise ValueError(f"need at least 2 clients in both runs to pair them, found {len(common)}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a 95 % interval, got {resamples}")
    xa = np.array([float(a[k]) for k in common])
    xb = np.array([float(b[k]) for k in common])
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        raise ValueError("per-client scores must be finite")
    if relative and ((xa <= 0).any() or (xb <= 0).any()):
        raise ValueError("a relative comparison needs positive scores (perplexities)")
    sign = -1.0 if lower_is_better else 1.0
    better = int((sign * (xa - xb) > 0).sum())
    worse = int((sign * (xa - xb) < 0).sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(common), size=(resamples, len(common)))
    diff, low, high = {}, {}, {}
    for stat in STATS:  # in log space when relative: a ratio of stats is a difference of their logs
        if relative and stat == "mean":
            point = float(np.mean(np.log(xa) - np.log(xb)))
            boot = np.mean(np.log(xa)[idx] - np.log(xb)[idx], axis=1)
        elif relative:
            point = float(np.log(_stat(xa, stat)) - np.log(_stat(xb, stat)))
            boot = np.log(_stat(xa[idx], stat)) - np.log(_stat(xb[idx], stat))
        else:
            point = float(_stat(xa, stat) - _stat(xb, stat))
            boot = _stat(xa[idx], stat) - _stat(xb[idx], stat)
        lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
        diff[stat], low[stat], high[stat] = (math.expm1(v) if relative else v for v in (point, lo, hi))
    return Paired(len(common), better, worse, diff, low, high)


def describe(p: Paired, stat: str, relative: bool) -> str:
    """``-0.9 % [-1.6, -0.2]`` (relative) or ``+3.1 pts [+1.0, +5.2]``: the difference and its interval."""
    if relative:
        return f"{100 * p.diff[stat]:+.2f} % [{100 * p.low[stat]:+.2f}, {100 * p.high[stat]:+.2f}]"
    return f"{100 * p.diff[stat]:+.1f} pts [{100 * p.low[stat]:+.1f}, {100 * p.high[stat]:+.1f}]"


def read_clients(mode_dir: Path) -> tuple[dict[int, float], P.Score]:
    """Per-client final scores of one mode's folder: (client → score, which score: its headline).

    From ``clients.csv`` (a Flower simulation) or else ``summary.json``'s ``clients`` rows (the
    sequential runner and the benchmark cells).
    """
    csv_path, summary_path = mode_dir / "clients.csv", mode_dir / "summary.json"
    if csv_path.is_file():
        with csv_path.open(newline="") as fh:
            rows: list[dict[str, Any]] = list(csv.DictReader(fh))
        score = P.headline(lambda s: any(r.get(s.metric) for r in rows))
        column = score.metric
    elif summary_path.is_file():
        rows = list(json.loads(summary_path.read_text()).get("clients", []))
        score = P.headline(lambda s: any(s.row in r for r in rows))
        column = score.row
    else:
        raise FileNotFoundError(f"neither {csv_path} nor {summary_path}: is this a finished run folder?")
    scores = {}
    for r in rows:
        value = r.get(column, "")
        if value not in ("", None) and math.isfinite(float(value)):
            scores[int(r["client"])] = float(value)
    return scores, score


def paired_table(run_dir: Path, modes: Sequence[str], base: str) -> str:
    """Markdown: ``base`` against every other mode of a compare folder, paired over clients."""
    if base not in modes:
        raise ValueError(f"base mode {base!r} is not among the compared modes {list(modes)}")
    scores = {m: read_clients(run_dir / m) for m in modes}
    score = scores[base][1]
    causal = score.lower_is_better  # perplexity: compared as a relative change
    rows = []
    for other in (m for m in modes if m != base):
        p = paired(scores[base][0], scores[other][0], lower_is_better=causal, relative=causal)
        stats = STATS if causal else STATS[:2]
        rows.append(
            [f"{base} vs {other}", str(p.n), f"{p.better} / {p.worse}"]
            + [describe(p, s, causal) for s in stats]
        )
    what = score.name
    head = ["pair", "clients", f"{base} better / worse"] + [
        f"{what} {s} difference [95 % CI]" for s in (STATS if causal else STATS[:2])
    ]
    unit = "relative change, lower is better" if causal else "points"
    note = (
        f"\nPaired over clients ({base} − other; {unit}); the interval resamples clients "
        f"({RESAMPLES} bootstrap draws), not the training's DP noise.\n"
    )
    return markdown_table(head, rows) + note


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: the paired table of a finished compare folder."""
    ap = argparse.ArgumentParser(prog="python -m simulations.paired", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished `fedpers simulate --compare` run")
    ap.add_argument("--base", default="fedper", help="the mode every other one is compared with")
    ap.add_argument("--modes", default="", help="comma-separated modes (default: every mode folder in RUN)")
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a folder", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m] or sorted(
        {p.parent.name for pattern in ("*/clients.csv", "*/summary.json") for p in args.run_dir.glob(pattern)}
    )
    try:
        print(paired_table(args.run_dir, modes, args.base), end="")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
