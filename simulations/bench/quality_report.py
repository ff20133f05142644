"""Tables and plots of the quality benchmark."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from simulations.bench.output import markdown_table
from simulations.bench.quality import MODES, SETTINGS, client_scores, targets
from simulations.paired import describe, paired

PRIVACY_LABEL = {"none": "no DP", "eps8": "ε=8", "eps3": "ε=3", "eps1": "ε=1"}


def _pm(row: dict[str, Any], stat: str) -> str:
    sd = row[f"{stat}-sd"]
    return f"{row[stat]:.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}")


def quality_table(
    rows: list[dict[str, Any]],
    planned: int,
    done: dict[str, dict[str, Any]],
    ledger: tuple[int, int] = (0, 0),
) -> str:
    """Markdown: one table per setting (mode × privacy), own-majority baseline, target verdicts.

    ``done`` are the finished cells' summaries (their per-client rows pair the target comparisons).
    """
    parts = [f"Cells finished: {len(done)} of {planned} planned (mean ± sd over the seeds finished).\n"]
    if ledger[1]:
        parts.append(
            f"ε check: in {ledger[0]} of {ledger[1]} finished DP cells the table's ε max equals the largest "
            "ε in the cell's ledger.json (the clients' own accountants).\n"
        )
    for setting in SETTINGS:
        sub = [r for r in rows if r["setting"] == setting]
        if not sub:
            continue
        parts.append(f"\n**{setting}** — own-majority-label baseline: mean {sub[0]['majority-mean']:.3f}, "
                     f"p10 {sub[0]['majority-p10']:.3f}\n\n")  # fmt: skip
        parts.append(
            markdown_table(
                ("mode", "privacy", "seeds", "acc mean", "acc median", "acc p10", "ε max", "s / run"),
                [
                    (
                        r["mode"],
                        PRIVACY_LABEL[r["privacy"]],
                        r["seeds"],
                        _pm(r, "mean"),
                        _pm(r, "median"),
                        _pm(r, "p10"),
                        f"{r['epsilon-max']:.2f}" if r["privacy"] != "none" else "–",
                        f"{r['seconds']:.0f}",
                    )
                    for r in sub
                ],
            )
        )
        verdicts = targets(rows, setting, done)
        if verdicts:
            parts.append("\n" + markdown_table(("target", "figures", "verdict"), verdicts))
        against = paired_vs_local(done, setting)
        if against:
            parts.append(
                f"\nPersonal modes against DP local at the same ε, paired over clients ({setting}; "
                "difference in points [95 % CI over clients]):\n\n"
                + markdown_table(("privacy", "mode", "clients better / worse", "mean", "p10"), against)
            )
    return "".join(parts)


def paired_vs_local(done: dict[str, dict[str, Any]], setting: str) -> list[tuple[str, ...]]:
    """fedper, fedsa and ffa against local at each DP level of ``setting`` whose cells have finished."""
    out: list[tuple[str, ...]] = []
    for privacy in ("eps8", "eps3", "eps1"):
        local = client_scores(done, setting, privacy, "local")
        for mode in ("fedper", "fedsa", "ffa"):
            mine = client_scores(done, setting, privacy, mode)
            if sum(k in local for k in mine) < 2:
                continue
            p = paired(mine, local, lower_is_better=False)
            out.append(
                (
                    PRIVACY_LABEL[privacy],
                    mode,
                    f"{p.better} / {p.worse}",
                    describe(p, "mean", relative=False),
                    describe(p, "p10", relative=False),
                )
            )
    return out


def quality_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: mean per-client accuracy per mode and privacy level, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    privs = ["none", "eps8", "eps3", "eps1"]
    width = 0.8 / len(privs)
    for ax, setting in zip(axes[0], settings, strict=True):
        sub = {(r["privacy"], r["mode"]): r for r in rows if r["setting"] == setting}
        for i, priv in enumerate(privs):
            xs, ys, es = [], [], []
            for j, mode in enumerate(MODES):
                r = sub.get((priv, mode))
                if r is not None:
                    xs.append(j + (i - 1.5) * width)
                    ys.append(r["mean"])
                    es.append(0.0 if math.isnan(r["mean-sd"]) else r["mean-sd"])
            if xs:
                ax.bar(xs, ys, width, yerr=es, label=PRIVACY_LABEL[priv], capsize=2)
        base = next(iter(sub.values()))["majority-mean"]
        ax.axhline(base, color="k", ls="--", lw=1, label="own majority")
        ax.set_xticks(range(len(MODES)), MODES, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_title(setting)
        ax.set_ylabel("mean per-client test accuracy")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
