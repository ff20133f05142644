"""End-of-run outputs: ``clients.csv``, ``report.md`` and PNG plots in the run folder."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common import protocol as P
from common.config import Config
from common.fileio import write_bytes_atomic, write_json_atomic
from server.audit.ledger import replace_one_epsilon
from server.ledger import Ledger
from server.recorder import Recorder, distribution

COLUMNS = (
    "client",
    "user",  # simulation: the user the runner gave this partition (empty in a deployment: never sent)
    "num-examples",
    "test-examples",
    P.MAJORITY_ACC,
    P.ACC_BEFORE,
    P.ACC_AFTER,
    P.EVAL_ACC,
    P.PPL_BEFORE,
    P.PERPLEXITY,
    P.MAJORITY_F1,
    P.ENTITY_F1,
    P.EPSILON,
    P.DELTA,
    P.SIGMA,
    P.TOTAL_STEPS,
    P.BYTES_UP,
    "rounds",
)


def summarize(recorder: Recorder, shared_bytes: int, model_bytes: int) -> dict[str, Any]:
    """The run's headline numbers (also used by the --compare table)."""
    rows = list(recorder.clients.values())
    acc = [float(r[P.EVAL_ACC]) for r in rows if r.get(P.EVAL_ACC) is not None]
    maj = [float(r[P.MAJORITY_ACC]) for r in rows if r.get(P.MAJORITY_ACC) is not None]
    eps = [float(r[P.EPSILON]) for r in rows if r.get(P.EPSILON) is not None]
    ups = [float(r[P.BYTES_UP]) for r in rows if r.get(P.BYTES_UP) is not None]
    out: dict[str, Any] = {"clients": len(rows), "rounds": len(recorder.rounds)}
    out.update(distribution(acc, "acc"))
    out.update(distribution(maj, "majority"))
    for key in (P.PERPLEXITY, P.PPL_BEFORE, P.ENTITY_F1, P.MAJORITY_F1):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        out.update(distribution(vals, key))
    if eps:
        out.update({"epsilon-max": max(eps), "epsilon-mean": float(np.mean(eps))})
    out["bytes-up-per-client-round"] = float(np.mean(ups)) if ups else float(shared_bytes)
    out["shared-bytes"] = shared_bytes
    out["model-bytes"] = model_bytes
    out["shared-fraction"] = shared_bytes / model_bytes if model_bytes else 0.0
    out["seconds"] = float(sum(r.get("seconds", 0.0) for r in recorder.rounds))
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]], users: Mapping[int, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["client"]):
            writer.writerow({**{k: row.get(k, "") for k in COLUMNS}, "user": users.get(row["client"], "")})


def _user_table(rows: list[dict[str, Any]], users: Mapping[int, str]) -> list[str]:
    """report.md lines: one row per client with its user, training examples, final score and ε."""
    score = P.headline(lambda s: any(r.get(s.metric) is not None for r in rows))
    key = score.metric
    out = ["", f"| client | user | train examples | test {score.name} | ε |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["client"]):
        cells = [r.get(P.NUM_EXAMPLES, "–"), r.get(key), r.get(P.EPSILON)]
        shown = [f"{c:.3f}" if isinstance(c, float) else "–" if c is None else str(c) for c in cells]
        out.append(f"| {r['client']} | {users.get(r['client'], '')} | " + " | ".join(shown) + " |")
    return out


def _plots(out: Path, recorder: Recorder) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = sorted(recorder.clients.values(), key=lambda r: r["client"])
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.35), 3.5))
        x = np.arange(len(rows))
        for offset, key, label in (
            (-0.27, P.MAJORITY_ACC, "own majority label"),
            (0.0, P.ACC_BEFORE, "before local training (last round)"),
            (0.27, P.EVAL_ACC, "personalized (final)"),
        ):
            ax.bar(x + offset, [float(r.get(key) or 0) for r in rows], width=0.27, label=label)
        ax.set_xticks(x, [str(r["client"]) for r in rows], fontsize=7)
        ax.set_xlabel("client")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "accuracy_per_client.png", dpi=110)
        plt.close(fig)
        files.append("accuracy_per_client.png")
    if recorder.eps_history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for cid, pts in sorted(recorder.eps_history.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1, label=str(cid))
        ax.set_xlabel("round")
        ax.set_ylabel("ε spent (client accountant)")
        fig.tight_layout()
        fig.savefig(out / "epsilon_per_client.png", dpi=110)
        plt.close(fig)
        files.append("epsilon_per_client.png")
    return files


def write_report(
    out: Path,
    cfg: Config,
    recorder: Recorder,
    ledger: Ledger,
    *,
    shared_bytes: int,
    model_bytes: int,
    users: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Write clients.csv, plots and report.md; return the summary.

    ``users``: a simulation's partition id → user name (from the runner), shown beside each client.
    """
    _write_csv(out / "clients.csv", list(recorder.clients.values()), users or {})
    plots = _plots(out, recorder)
    s = summarize(recorder, shared_bytes, model_bytes)
    released = [e for e in ledger.user_level_entries() if e.get("status") == "released"]
    if released:  # the main guarantee of a user-level run: about a whole user, at population N
        last = released[-1]
        s.update(
            {
                "user-epsilon": float(last["user-epsilon"]),
                "user-delta": float(last["user-delta"]),
                "user-population": int(last["user-population"]),
                "user-sample-rate": float(last["user-sample-rate"]),
                "user-noise-multiplier": float(last["user-noise-multiplier"]),
            }
        )
        history = [(float(e["user-noise-multiplier"]), float(e["user-sample-rate"]), 1) for e in released]
        s["user-epsilon-within-user"] = replace_one_epsilon(history, float(last["user-delta"]))
        if "user-virtual-cohort" in last:  # deployment-scale accounting: not about the simulated users
            s["user-virtual-cohort"] = int(last["user-virtual-cohort"])
            s["user-simulated-population"] = int(last["user-simulated-population"])
    lines = [
        f"# fedpers run: {cfg.personalization.mode} on {cfg.task.dataset}",
        "",
        f"- clients: {s['clients']}, rounds: {s['rounds']}, model: {cfg.model.name} "
        f"(LoRA r={cfg.lora.r} on {cfg.lora.target_modules}, top layers from {cfg.model.frozen_layers})",
        f"- DP: {'on' if cfg.dp.enabled else 'off'}"
        + (
            f", budget ε={cfg.dp.epsilon} per client, "
            f"δ={'min(1e-5, 0.1/n_train)' if not cfg.dp.delta else cfg.dp.delta}, "
            f"{cfg.dp.accountant.upper()} accountant, clip {cfg.dp.max_grad_norm}"
            if cfg.dp.enabled
            else ""
        ),
        f"- shared payload per client per round: {s['bytes-up-per-client-round']:.0f} bytes up "
        f"({100 * s['shared-fraction']:.3f} % of the model's {model_bytes / 1e6:.1f} MB)",
        "",
        "| per-client test accuracy | mean | median | p10 |",
        "|---|---|---|---|",
    ]
    for label, key in (("personalized (final)", "acc"), ("own majority label", "majority")):
        if f"{key}-mean" in s:
            lines.append(
                f"| {label} | {s[f'{key}-mean']:.3f} | {s[f'{key}-median']:.3f} | {s[f'{key}-p10']:.3f} |"
            )
    if "epsilon-max" in s:
        lines += [
            "",
            f"ε spent per client: max {s['epsilon-max']:.3f}, mean {s['epsilon-mean']:.3f} "
            f"(budget {cfg.dp.epsilon})",
        ]
    if "user-virtual-cohort" in s:
        lines += [
            "",
            f"Deployment-scale accounting (virtual cohort): noise as for a mean over "
            f"{s['user-virtual-cohort']} of {s['user-population']} users, ε = {s['user-epsilon']:.3f} at "
            f"δ = {s['user-delta']:.1e}, q = {s['user-sample-rate']:g}, "
            f"z = {s['user-noise-multiplier']:.3f}. This is NOT a guarantee for the "
            f"{s['user-simulated-population']} users simulated here: it says what a deployment of that "
            "size would get.",
        ]
    elif "user-epsilon" in s:
        lines += [
            "",
            f"User-level DP (server): ε = {s['user-epsilon']:.3f} at δ = {s['user-delta']:.1e} for adding or "
            f"removing one user's whole data, population {s['user-population']}, Poisson cohorts with "
            f"q = {s['user-sample-rate']:g}, z = {s['user-noise-multiplier']:.3f}. A change confined to "
            f"one user's data (one of their examples, or all of it replaced) is a replacement, not an "
            f"addition or removal: ε = {s['user-epsilon-within-user']:.3f} at the same δ (replace-one, "
            "dp-accounting PLD).",
        ]
    if users:
        lines += _user_table(list(recorder.clients.values()), users)
    refused = [e for e in ledger.entries if e["status"] != "accepted"]
    if refused:
        lines += ["", f"{len(refused)} replies refused or rejected (see ledger.json)."]
    lines += ["", "Files: config.json, metrics.jsonl, clients.csv, ledger.json, " + ", ".join(plots), ""]
    write_bytes_atomic(out / "report.md", "\n".join(lines).encode())
    write_json_atomic(out / "summary.json", {"mode": cfg.personalization.mode, "dp": cfg.dp.enabled, **s})
    return s
