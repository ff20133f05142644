"""Run the same federation under several personalization modes and tabulate them side by side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.fileio import write_bytes_atomic, write_json_atomic
from simulations.run import SimSettings, simulate


def compare(
    settings: SimSettings,
    modes: tuple[str, ...],
    run_dir: Path,
    on_round: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Simulate each mode into ``run_dir/<mode>`` and write ``compare.md`` / ``compare.json``."""
    rows: list[dict[str, Any]] = []
    for mode in modes:
        sub = replace(settings, overrides={**settings.overrides, "personalization.mode": mode})
        callback = (lambda line, m=mode: on_round(m, line)) if on_round else None
        summary = simulate(sub, run_dir / mode, callback)
        rows.append({"mode": mode, **summary})
    if rows and "majority-mean" in rows[0]:
        base = rows[0]
        rows.append(
            {
                "mode": "own-majority (trivial)",
                "acc-mean": base["majority-mean"],
                "acc-median": base["majority-median"],
                "acc-p10": base["majority-p10"],
                "bytes-up-per-client-round": 0.0,
            }
        )
    if rows and "perplexity-before-mean" in rows[0]:
        base = rows[0]
        rows.append(
            {
                "mode": "pretrained (before personalization)",
                **{k.replace("perplexity-before", "perplexity"): v for k, v in base.items() if "before" in k},
            }
        )
    write_json_atomic(run_dir / "compare.json", rows)
    write_bytes_atomic(run_dir / "compare.md", table(rows).encode())
    return rows


def lm_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of a causal LM's compare rows: per-user test perplexity (lower is better)."""
    out = [
        "| mode | perplexity mean | median | p10 | p90 (worst users) | next-token acc mean | ε max "
        "| bytes up / client / round | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in rows:
        eps = f"{r['epsilon-max']:.2f}" if "epsilon-max" in r else "–"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "–"
        out.append(
            f"| {r['mode']} | {r.get('perplexity-mean', nan):.2f} | {r.get('perplexity-median', nan):.2f} "
            f"| {r.get('perplexity-p10', nan):.2f} | {r.get('perplexity-p90', nan):.2f} "
            f"| {r.get('acc-mean', nan):.3f} | {eps} | {r.get('bytes-up-per-client-round', 0):.0f} | {secs} |"
        )
    return "\n".join(out) + "\n"


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of compare rows."""
    if rows and "perplexity-mean" in rows[0]:
        return lm_table(rows)
    out = [
        "| mode | acc mean | acc median | acc p10 | ε max | bytes up / client / round | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in rows:
        eps = f"{r['epsilon-max']:.2f}" if "epsilon-max" in r else "–"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "–"
        out.append(
            f"| {r['mode']} | {r.get('acc-mean', nan):.3f} | {r.get('acc-median', nan):.3f} "
            f"| {r.get('acc-p10', nan):.3f} | {eps} | {r.get('bytes-up-per-client-round', 0):.0f} "
            f"| {secs} |"
        )
    return "\n".join(out) + "\n"
