"""Quality benchmark: per-client test accuracy of every mode × privacy level × seed on non-IID data.

Settings: tweets with Dirichlet label skew α = 0.3 and α = 1.0 (20 clients) and news interests (20
users). Privacy: none, and sample-level ε = 8, 3, 1 per client with δ = 1/n_client, from each client's
own accountant (the one it trains with; the ledger of every cell is kept). Hyper-parameters come from
``simulations/configs/bench-tuned.toml``, chosen by :mod:`simulations.bench.tune` on validation splits.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError
from simulations.bench.grid import Cell, read_ledger
from simulations.paired import paired

SETTINGS: dict[str, dict[str, Any]] = {
    "tweets-a0.3": {"task.dataset": "tweets", "task.dirichlet-alpha": 0.3},
    "tweets-a1.0": {"task.dataset": "tweets", "task.dirichlet-alpha": 1.0},
    "news": {"task.dataset": "news", "task.topics-liked": 2, "task.max-length": 96},
}
PRIVACY: dict[str, dict[str, Any]] = {
    "eps8": {"dp.enabled": True, "dp.epsilon": 8.0},
    "none": {"dp.enabled": False},
    "eps3": {"dp.enabled": True, "dp.epsilon": 3.0},
    "eps1": {"dp.enabled": True, "dp.epsilon": 1.0},
}
MODES = ("local", "fedavg", "fedavg-ft", "fedper", "fedsa", "ffa")
BASE: dict[str, Any] = {
    "task.train-size": 250,
    "task.test-size": 100,
    "lora.r": 8,
    "fed.num-rounds": 5,
    "dp.delta": 0.0,  # 1 / n_client
    "train.threads": 1,
    "client.report-before-after": False,  # only the evaluation after aggregation is scored
    "fed.evaluate-every": 1000,  # only the last round's evaluation is scored: skip the ones between
}
NUM_CLIENTS = 20
TUNED = Path(__file__).resolve().parents[1] / "configs" / "bench-tuned.toml"


def load_tuned(path: Path = TUNED) -> dict[str, dict[str, Any]]:
    """Tuned overrides per mode (``[default]`` applies to modes without their own table)."""
    if not path.is_file():
        return {}
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return {k: dict(v) for k, v in data.items() if isinstance(v, dict)}


def tuned_for(tuned: dict[str, dict[str, Any]], mode: str) -> dict[str, Any]:
    """The tuned overrides a mode runs with."""
    return {**tuned.get("default", {}), **tuned.get(mode, {})}


def check_modes(modes: Sequence[str]) -> None:
    """Raise a ConfigError naming any unknown personalization mode."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown mode {bad}; choose from {', '.join(MODES)}")


def plan(
    settings: Sequence[str],
    privacies: Sequence[str],
    modes: Sequence[str],
    seeds: Sequence[int],
    tuned: dict[str, dict[str, Any]],
) -> list[Cell]:
    """The grid in priority order: seed, then privacy (ε=8 and none first), then setting, then mode."""
    for name, known in (("setting", SETTINGS), ("privacy", PRIVACY)):
        values = settings if name == "setting" else privacies
        bad = [v for v in values if v not in known]
        if bad:
            raise ValueError(f"unknown {name} {bad}; choose from {', '.join(known)}")
    check_modes(modes)
    cells = []
    for seed in seeds:
        for privacy in [p for p in PRIVACY if p in privacies]:
            for setting in settings:
                for mode in modes:
                    over = {
                        **BASE,
                        **SETTINGS[setting],
                        **PRIVACY[privacy],
                        **tuned_for(tuned, mode),
                        "personalization.mode": mode,
                        "task.seed": 42 + seed,
                        "model.seed": seed,
                    }
                    key = f"{setting}/{privacy}/{mode}/seed{seed}"
                    cells.append(Cell(key, over, NUM_CLIENTS, group=f"{setting}/{privacy}/seed{seed}"))
    return cells


def aggregate(done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, privacy, mode): mean over seeds of mean/median/p10, with the spread."""
    table: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key, summary in done.items():
        setting, privacy, mode, _ = key.split("/")
        table.setdefault((setting, privacy, mode), []).append(summary)
    rows = []
    for (setting, privacy, mode), runs in table.items():
        row: dict[str, Any] = {"setting": setting, "privacy": privacy, "mode": mode, "seeds": len(runs)}
        for stat in ("mean", "median", "p10"):
            vals = np.array([r[f"acc-{stat}"] for r in runs])
            row[stat] = float(vals.mean())
            row[f"{stat}-sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        row["majority-mean"] = float(np.mean([r["majority-mean"] for r in runs]))
        row["majority-p10"] = float(np.mean([r["majority-p10"] for r in runs]))
        row["epsilon-max"] = float(max(r.get("epsilon-max", 0.0) for r in runs))
        row["seconds"] = float(np.mean([r["wall-seconds"] for r in runs]))
        rows.append(row)
    order = {p: i for i, p in enumerate(("none", "eps8", "eps3", "eps1"))}
    rows.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), order[r["privacy"]], MODES.index(r["mode"])))
    return rows


def _find(rows: list[dict[str, Any]], setting: str, privacy: str, mode: str) -> dict[str, Any] | None:
    for r in rows:
        if (r["setting"], r["privacy"], r["mode"]) == (setting, privacy, mode):
            return r
    return None


def client_scores(done: dict[str, dict[str, Any]], setting: str, privacy: str, mode: str) -> dict[str, float]:
    """Each client's final accuracy in the finished cells of one (setting, privacy, mode), over all seeds.

    Keys are ``seed<k>/<client>``: the cells of one setting and seed hold the same clients and test data
    in every mode and privacy level, so two such maps pair client by client.
    """
    out = {}
    for key, summary in done.items():
        s, p, m, seed = key.split("/")
        if (s, p, m) == (setting, privacy, mode):
            for c in summary.get("clients", []):
                out[f"{seed}/{c['client']}"] = float(c["acc"])
    return out


def targets(
    rows: list[dict[str, Any]], setting: str, done: dict[str, dict[str, Any]] | None = None
) -> list[tuple[str, str, str]]:
    """(target, figures, verdict) for the issue's ε = 8 targets, using the best DP fedpers mode.

    With the finished cells (``done``) each figure also gets the 95 % interval of the difference,
    paired over clients (:mod:`simulations.paired`; the verdict stays the point comparison).
    """
    personal = ("fedper", "fedsa", "ffa")
    dp8 = [r for r in rows if r["setting"] == setting and r["privacy"] == "eps8" and r["mode"] in personal]
    if not dp8:
        return []
    best = max(dp8, key=lambda r: r["mean"])
    name = f"DP {best['mode']} (best fedpers mode at ε=8)"
    out = []

    def check(label: str, ref: dict[str, Any] | None, stat: str, margin: float, ref_name: str) -> None:
        if ref is None:
            out.append((label, f"{ref_name}: not run yet", "open"))
            return
        gap = best[stat] - ref[stat]
        ok = gap >= margin
        figures = f"{best[stat]:.3f} vs {ref_name} {ref[stat]:.3f} (Δ {100 * gap:+.1f} pts)"
        if done:
            mine = client_scores(done, setting, "eps8", best["mode"])
            theirs = client_scores(done, setting, ref["privacy"], ref["mode"])
            if sum(k in theirs for k in mine) >= 2:
                p = paired(mine, theirs, lower_is_better=False)
                figures += (
                    f"; paired over {p.n} clients: 95 % CI [{100 * p.low[stat]:+.1f}, "
                    f"{100 * p.high[stat]:+.1f}] pts, better for {p.better}, worse for {p.worse}"
                )
        out.append((label, figures, "met" if ok else "MISSED"))

    check(
        "mean ≥ non-private local + 3", _find(rows, setting, "none", "local"), "mean", 0.03, "local (no DP)"
    )
    check("mean ≥ DP fedavg + 5", _find(rows, setting, "eps8", "fedavg"), "mean", 0.05, "DP fedavg")
    check(
        "mean within 3 of non-private fedper",
        _find(rows, setting, "none", "fedper"),
        "mean",
        -0.03,
        "fedper (no DP)",
    )
    check("p10 ≥ DP local p10", _find(rows, setting, "eps8", "local"), "p10", 0.0, "DP local")
    return [(f"{name}: {t}", fig, v) for t, fig, v in out]


def ledger_check(root: Path, done: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(cells whose table ε equals the max ε in their kept ledger, DP cells with a ledger)."""
    matched = total = 0
    for summary in done.values():
        if not summary.get("overrides", {}).get("dp.enabled", True):
            continue
        ledger = read_ledger(root, summary)
        if ledger is None:
            continue
        eps = [float(e["epsilon"]) for e in ledger.get("entries", []) if "epsilon" in e]
        total += 1
        matched += bool(eps) and max(eps) == float(summary.get("epsilon-max", -1.0))
    return matched, total
