"""Tune learning rates on VALIDATION splits (held out of each client's train data), never on test.

A small grid (LoRA and head learning rates) per tuned mode at the quality benchmark's main setting
(tweets α = 0.3, ε = 8, 20 clients, seed 0). The best candidate by mean validation accuracy (then p10)
is written to ``simulations/configs/bench-tuned.toml`` with every candidate's score, so the choice is
reproducible and auditable; the quality grid reads it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.fileio import write_bytes_atomic
from simulations.bench.grid import Cell
from simulations.bench.quality import BASE, NUM_CLIENTS, PRIVACY, SETTINGS, TUNED, check_modes

LR_LORA = (0.05,)
LR_HEAD = (0.5, 1.0)
TUNED_MODES = ("fedper", "local")


def tune_cells(
    modes: Sequence[str] = TUNED_MODES,
    setting: str = "tweets-a0.3",
    privacy: str = "eps8",
    server_lrs: Sequence[float] = (1.0,),
) -> list[Cell]:
    """The tuning grid: every (lr-lora, lr-head, server lr) candidate per mode, evaluated on validation.

    A server learning rate other than 1 (``fed.server-lr``, server.server_opt) is a candidate only for
    modes that share tensors; its cells' keys end in ``-slr<value>``.
    """
    check_modes(modes)
    bad = [v for v in server_lrs if not v > 0]
    if bad:
        raise ConfigError(f"server learning rates must be positive, got {bad}")
    cells = []
    for mode, lr_lora, lr_head, slr in itertools.product(modes, LR_LORA, LR_HEAD, server_lrs):
        if slr != 1.0 and mode == "local":
            continue  # local shares nothing: a server step would not change it
        over = {
            **BASE,
            **SETTINGS[setting],
            **PRIVACY[privacy],
            "personalization.mode": mode,
            "task.evaluate-on": "validation",
            "train.lr-lora": lr_lora,
            "train.lr-head": lr_head,
            "task.seed": 42,
            "model.seed": 0,
        }
        key = f"tune-{setting}-{privacy}/{mode}/lora{lr_lora}-head{lr_head}"
        if slr != 1.0:
            over["fed.server-lr"] = slr
            key += f"-slr{slr:g}"
        cells.append(Cell(key, over, NUM_CLIENTS, group=f"tune/{mode}"))
    return cells


def choose(cells: Sequence[Cell], done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Best candidate per mode: highest validation mean accuracy, ties broken by p10."""
    best: dict[str, tuple[tuple[float, float], Cell]] = {}
    for cell in cells:
        if cell.key not in done:
            continue
        score = (done[cell.key]["acc-mean"], done[cell.key]["acc-p10"])
        mode = str(cell.overrides["personalization.mode"])
        if mode not in best or score > best[mode][0]:
            best[mode] = (score, cell)
    keys = ("train.lr-lora", "train.lr-head", "fed.server-lr")
    return {
        mode: {k: cell.overrides[k] for k in keys if k in cell.overrides} for mode, (_, cell) in best.items()
    }


def write_tuned(
    chosen: dict[str, dict[str, Any]],
    cells: Sequence[Cell],
    done: dict[str, dict[str, Any]],
    command: str,
    path: Path = TUNED,
) -> None:
    """Write the chosen values (fedper's also as [default] for the other federated modes) with scores."""
    lines = [
        "# Learning rates for the quality benchmark, chosen on VALIDATION splits (never test) by:",
        f"#   {command}",
        "# Candidates (mode, lr-lora, lr-head, server lr → validation acc mean / p10):",
    ]
    for cell in cells:
        if cell.key in done:
            d = done[cell.key]
            o = cell.overrides
            lines.append(
                f"#   {o['personalization.mode']:>7} {o['train.lr-lora']:<5} {o['train.lr-head']:<5}"
                f" {o.get('fed.server-lr', 1.0):<4g} → {d['acc-mean']:.3f} / {d['acc-p10']:.3f}"
            )
    tables = dict(chosen)
    if "fedper" in chosen:
        tables = {"default": chosen["fedper"], **chosen}
    for name, values in tables.items():
        lines.append(f"\n[{name}]")
        lines += [f'"{k}" = {v}' for k, v in values.items()]
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
