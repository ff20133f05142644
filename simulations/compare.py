"""Run the same federation under several personalization modes and tabulate them side by side."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import protocol as P
from common.fileio import write_bytes_atomic, write_json_atomic
from simulations.paired import paired_table
from simulations.run import SimSettings, simulate

log = logging.getLogger("flwr")


def compare(
    settings: SimSettings,
    modes: tuple[str, ...],
    run_dir: Path,
    on_round: Callable[[str, dict[str, Any]], None] | None = None,
    users: Mapping[int, str] | None = None,
    sequential: bool = False,
) -> list[dict[str, Any]]:
    """Simulate each mode into ``run_dir/<mode>`` and write ``compare.md`` / ``compare.json``.

    The modes see the same texts through the same frozen prefix, so unless ``client.feature-cache`` is
    set, each client keeps its prefix features in ``run_dir/feature-cache`` (encrypted, see
    client.feature_cache) for the later modes; the folder is removed when every mode has finished.
    ``users``: each partition's user (simulations.preflight), shown in every mode's outputs.
    ``sequential``: run each mode in the plain loop (see simulations.run.simulate).
    """
    rows: list[dict[str, Any]] = []
    scratch = shared_feature_cache(settings.overrides, modes, run_dir)
    for mode in modes:
        over = {**settings.overrides, "personalization.mode": mode}
        if scratch is not None:
            over["client.feature-cache"] = str(scratch)
        callback = (lambda line, m=mode: on_round(m, line)) if on_round else None
        summary = simulate(replace(settings, overrides=over), run_dir / mode, callback, users, sequential)
        rows.append({"mode": mode, **summary})
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return write_comparison(run_dir, modes, rows)


def shared_feature_cache(overrides: Mapping[str, Any], modes: Sequence[str], run_dir: Path) -> Path | None:
    """``run_dir/feature-cache`` when several modes run and no ``client.feature-cache`` is configured."""
    if len(modes) > 1 and not overrides.get("client.feature-cache"):
        return run_dir / "feature-cache"
    return None


def write_comparison(
    run_dir: Path, modes: tuple[str, ...], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Add the baseline rows, write ``compare.json``, ``compare.md`` and ``paired.md``; returns the rows."""
    rows = list(rows)
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
    if rows and "majority-f1-mean" in rows[0]:
        base = rows[0]
        rows.append(
            {
                "mode": "own-majority tag per word (trivial)",
                **{k.replace("majority-f1", "entity-f1"): v for k, v in base.items() if "majority-f1" in k},
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
    write_paired(run_dir, modes)
    return rows


def write_paired(run_dir: Path, modes: tuple[str, ...]) -> Path | None:
    """``paired.md``: the first mode against each other one, paired over clients (None if < 2 modes)."""
    if len(modes) < 2:
        return None
    try:
        text = paired_table(run_dir, modes, modes[0])
    except (ValueError, FileNotFoundError) as exc:  # e.g. a mode evaluated no client: the run stays valid
        log.warning("no paired comparison for %s: %s", run_dir, exc)
        return None
    path = run_dir / "paired.md"
    write_bytes_atomic(path, text.encode())
    return path


_NAN = float("nan")
_TAIL = [  # (header, key, format, shown when the key is missing)
    ("ε max", "epsilon-max", "{:.2f}", "–"),
    ("user-level ε", "user-epsilon", "{:.2f}", "–"),
    ("bytes up / client / round", "bytes-up-per-client-round", "{:.0f}", "0"),
    ("seconds", "seconds", "{:.0f}", "–"),
]
_CLASSIFIER = [
    ("acc mean", "acc-mean", "{:.3f}", "nan"),
    ("acc median", "acc-median", "{:.3f}", "nan"),
    ("acc p10", "acc-p10", "{:.3f}", "nan"),
]
_LM = [  # per-user test perplexity: lower is better, p90 is the worst users
    ("perplexity mean", "perplexity-mean", "{:.2f}", "nan"),
    ("median", "perplexity-median", "{:.2f}", "nan"),
    ("p10", "perplexity-p10", "{:.2f}", "nan"),
    ("p90 (worst users)", "perplexity-p90", "{:.2f}", "nan"),
    ("next-token acc mean", "acc-mean", "{:.3f}", "nan"),
]


_TAGGER = [  # per-user exact-span entity F1 in the user's own label view
    ("entity F1 mean", "entity-f1-mean", "{:.3f}", "nan"),
    ("median", "entity-f1-median", "{:.3f}", "nan"),
    ("p10", "entity-f1-p10", "{:.3f}", "nan"),
    ("token acc mean", "acc-mean", "{:.3f}", "nan"),
]


_COLUMNS = {P.PERPLEXITY: _LM, P.ENTITY_F1: _TAGGER, P.EVAL_ACC: _CLASSIFIER}  # by headline score


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of compare rows: the columns of the task's score (perplexity, entity F1, acc)."""
    head = rows[0] if rows else {}
    score = _COLUMNS[P.headline(lambda s: f"{s.metric}-mean" in head).metric]
    user_level = any("user-epsilon" in r for r in rows)  # the column only where a run released under it
    columns = score + [c for c in _TAIL if c[1] != "user-epsilon" or user_level]
    out = [
        "| mode | " + " | ".join(h for h, *_ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else missing for _, key, fmt, missing in columns]
        out.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
