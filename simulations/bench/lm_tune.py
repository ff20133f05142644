"""Tune the generative assistant's training on VALIDATION splits (never test): `fedpers bench lm-tune`.

The workload is ``simulations/configs/shakespeare.toml`` (20 roles, ε = 8 per user) with
``task.evaluate-on = validation``: each role's last 20 % of training speeches are held out and scored,
its test speeches are never read. Every candidate runs for every compared mode (``fedper``, ``local``,
``fedavg``), so each mode is tuned equally; each mode's best candidate (lowest mean validation
perplexity, then p90) is written with every candidate's scores to
``simulations/configs/shakespeare-tuned.toml``, which the shakespeare simulation reads per mode.
Cells run through the sequential runner (the same client code as the Flower simulation), so the frozen
prefix of every speech is computed once per worker process and shared by all cells of that worker.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.fileio import write_bytes_atomic
from simulations.bench.grid import Cell
from simulations.bench.output import markdown_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WORKLOAD = CONFIGS / "shakespeare.toml"
TUNED_LM = CONFIGS / "shakespeare-tuned.toml"
MODES = ("fedper", "local", "fedavg")
_BIAS = {
    "train.local-epochs": 1,
    "model.personal-part": "bias",
    "dp.max-grad-norm": 0.05,
    "train.lr-head": 30.0,
}
# Candidates in the order they run. "e1" is the untuned setting (1 local epoch = 4 DP steps per round).
CANDIDATES: dict[str, dict[str, Any]] = {
    "e1": {"train.local-epochs": 1},
    "e4": {"train.local-epochs": 4},
    "e4-lora0.5": {"train.local-epochs": 4, "train.lr-lora": 0.5},
    "e4-head0.2": {"train.local-epochs": 4, "train.lr-head": 0.2},
    "e4-lora0.5-head0.2": {"train.local-epochs": 4, "train.lr-lora": 0.5, "train.lr-head": 0.2},
    # A 576-number personal offset instead of the rank-8 adapter, and a clipping norm near the per-example
    # gradient norms (adapter ~2-4, LoRA ~0.2, offset ~0.05 at C = 1: `python -m research.lm_probe`).
    "bias-c0.05": {**_BIAS, "train.lr-lora": 0.5},
    "bias-c0.05-l2": {**_BIAS, "train.lr-lora": 2.0},
    # The last decoder block's LoRA as the personal part (block 28's LoRA shared in fedper) at the clip
    # and LoRA learning rate that made LoRA move: local's LoRA holds ~10x more per-user signal than the
    # offset (`python -m research.lm_style`), so a personal LoRA may carry what the offset cannot.
    "lastblock-c0.05-l2": {
        "train.local-epochs": 1,
        "model.personal-part": "last-block",
        "dp.max-grad-norm": 0.05,
        "train.lr-lora": 2.0,
        "train.lr-head": 2.0,
    },
}
# The same with a server learning rate (server.server_opt; post-processing, so free in ε; a no-op for
# local, which shares nothing). On validation it reached about what a larger client lr reaches
# (research/ASSISTANT.md).
for _slr in (2.0, 4.0):
    CANDIDATES[f"lastblock-c0.05-l2-slr{_slr:g}"] = {
        **CANDIDATES["lastblock-c0.05-l2"],
        "fed.server-lr": _slr,
    }
# The counterpart open to every mode: larger client learning rates (a user's own step, noise and all).
for _lr in (4.0, 8.0, 16.0):
    CANDIDATES[f"lastblock-c0.05-l{_lr:g}"] = {
        **CANDIDATES["lastblock-c0.05-l2"],
        "train.lr-lora": _lr,
        "train.lr-head": _lr,
    }
CANDIDATES["lastblock-c0.05-l8-slr2"] = {**CANDIDATES["lastblock-c0.05-l8"], "fed.server-lr": 2.0}
# The personal last block at the lr it takes best alone (local: lr 4), while the server doubles the step of
# the shared block, whose average carries ~1/sqrt(20) of one user's noise: a personal part that can hold
# the user's style (local's LoRA does: `python -m research.lm_style`) beside a shared part at a large step.
CANDIDATES["lastblock-c0.05-l4-slr2"] = {**CANDIDATES["lastblock-c0.05-l4"], "fed.server-lr": 2.0}
# The same split of rates without the server step: the shared block at the client lr the federated modes
# take best (8, 16), the personal block (`head.*`, so `train.lr-head`) at local's best, 4.
for _lr in (8.0, 16.0):
    CANDIDATES[f"lastblock-c0.05-l{_lr:g}-p4"] = {
        **CANDIDATES[f"lastblock-c0.05-l{_lr:g}"],
        "train.lr-head": 4.0,
    }
# Both blocks' LoRA shared (fedper) and only the 576-number offset personal, at the larger LoRA lrs.
for _lr in (4.0, 8.0, 16.0):
    CANDIDATES[f"bias-c0.05-l{_lr:g}"] = {**_BIAS, "train.lr-lora": _lr}
# Keys a mode's choice writes (a candidate that leaves one unset ran with the workload's value).
TUNED_KEYS = (
    "train.local-epochs",
    "train.lr-lora",
    "train.lr-head",
    "model.personal-part",
    "dp.max-grad-norm",
    "fed.server-lr",
)


def workload(path: Path = WORKLOAD) -> tuple[int, dict[str, Any]]:
    """(number of users, run-config overrides) of the shakespeare simulation."""
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return int(data["simulation"]["num-clients"]), dict(data["run-config"])


def lm_tune_cells(candidates: Sequence[str], modes: Sequence[str] = MODES) -> list[Cell]:
    """Every candidate × mode on validation splits; one group per candidate (its modes share features)."""
    bad = [c for c in candidates if c not in CANDIDATES]
    if bad:
        raise ValueError(f"unknown candidate {bad}; choose from {', '.join(CANDIDATES)}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode {bad}; choose from {', '.join(MODES)}")
    users, base = workload()
    cells = []
    for name in candidates:
        for mode in modes:
            over = {
                **base,
                **CANDIDATES[name],
                "personalization.mode": mode,
                "task.evaluate-on": "validation",
                "train.threads": 1,
                "client.report-before-after": False,
                "fed.evaluate-every": 1000,  # only the last round is scored
            }
            cells.append(Cell(f"lm-tune/{name}/{mode}", over, users, group=f"lm-tune/{name}"))
    return cells


def _score(summary: dict[str, Any]) -> tuple[float, float]:
    return float(summary["perplexity-mean"]), float(summary["perplexity-p90"])


def choose(cells: Sequence[Cell], done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each mode's candidate with the lowest mean validation perplexity (ties: the lower p90)."""
    best: dict[str, tuple[tuple[float, float], Cell]] = {}
    for cell in cells:
        if cell.key not in done:
            continue
        mode = str(cell.overrides["personalization.mode"])
        score = _score(done[cell.key])
        if mode not in best or score < best[mode][0]:
            best[mode] = (score, cell)
    return {
        mode: {k: cell.overrides[k] for k in TUNED_KEYS if k in cell.overrides}
        for mode, (_, cell) in best.items()
    }


def lm_tune_table(cells: Sequence[Cell], done: dict[str, dict[str, Any]]) -> str:
    """Validation perplexity of every finished cell, and each mode's choice."""
    rows = []
    for cell in cells:
        if cell.key not in done:
            continue
        d = done[cell.key]
        _, name, mode = cell.key.split("/")
        rows.append(
            [
                name,
                mode,
                *(f"{d[f'perplexity-{s}']:.2f}" for s in ("mean", "median", "p10", "p90")),
                f"{d.get('epsilon-max', 0.0):.2f}",
                f"{d['wall-seconds']:.0f}",
            ]
        )
    head = ["candidate", "mode", "ppl mean", "median", "p10", "p90 (worst)", "ε max", "s"]
    out = markdown_table(head, rows) + "\n"
    for mode, values in choose(cells, done).items():
        out += f"- {mode}: " + ", ".join(f"`{k} = {v}`" for k, v in values.items()) + "\n"
    return out


def write_tuned_lm(
    chosen: dict[str, dict[str, Any]],
    cells: Sequence[Cell],
    done: dict[str, dict[str, Any]],
    command: str,
    path: Path = TUNED_LM,
) -> None:
    """Write each mode's chosen values as ``[mode.<name>]`` tables, with every candidate's scores."""
    lines = [
        "# Training settings of the generative assistant per mode, chosen on VALIDATION splits (never test):",
        f"#   {command}",
        "# Candidates (candidate, mode → validation perplexity mean / p90):",
    ]
    for cell in cells:
        if cell.key in done:
            _, name, mode = cell.key.split("/")
            mean, p90 = _score(done[cell.key])
            lines.append(f"#   {name:<20} {mode:<7} → {mean:.2f} / {p90:.2f}")
    for mode, values in chosen.items():
        lines.append(f"\n[mode.{mode}]")
        lines += [f'"{k}" = {json.dumps(v)}' for k, v in values.items()]  # a JSON scalar is a TOML one
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
