"""Per-round and per-client metrics of a run: ``metrics.jsonl`` (a line per round) and the client table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import protocol as P
from common.fileio import write_json_atomic

# Called with each finished round's summary (the simulate command shows progress with it).
ROUND_LISTENERS: list[Callable[[dict[str, Any]], None]] = []


def distribution(values: list[float], prefix: str) -> dict[str, float]:
    """mean, median and 10th percentile of ``values`` under ``prefix``."""
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    out = {
        f"{prefix}-mean": float(arr.mean()),
        f"{prefix}-median": float(np.median(arr)),
        f"{prefix}-p10": float(np.percentile(arr, 10)),
    }
    if prefix.startswith("perplexity"):  # lower is better: the worst 10 % of users are above p90
        out[f"{prefix}-p90"] = float(np.percentile(arr, 90))
    return out


class Recorder:
    """Collects replies of the current round and keeps the latest state of every client."""

    def __init__(self, run_dir: str | Path, total_rounds: int, resume: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.state_path = Path(run_dir) / "recorder-state.json"
        self.total_rounds = total_rounds
        self.clients: dict[int, dict[str, Any]] = {}
        self.eps_history: dict[int, list[tuple[int, float]]] = {}
        self.rounds: list[dict[str, Any]] = []
        if resume and self.path.exists():  # resumed run: keep the earlier rounds and client rows
            self.rounds = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if self.state_path.exists():
                saved = json.loads(self.state_path.read_text())
                self.clients = {int(k): v for k, v in saved["clients"].items()}
                self.eps_history = {int(k): [tuple(p) for p in v] for k, v in saved["eps_history"].items()}
        else:  # a fresh start in this folder
            self.path.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
        self._train: list[dict[str, Any]] = []
        self._eval: list[dict[str, Any]] = []
        self._rejected: list[str] = []
        self._refused: list[str] = []

    def _client(self, node: int, metrics: dict[str, Any], client: int | None) -> dict[str, Any]:
        cid = int(metrics.get(P.PARTITION_ID, node)) if client is None else int(client)
        row = self.clients.setdefault(cid, {"client": cid, "node_id": node})
        row["node_id"] = node
        return row

    def train_reply(
        self, rnd: int, node: int, metrics: dict[str, Any], norm: float, client: int | None = None
    ) -> None:
        """An accepted train reply (``client``: the device's identity; default its partition id)."""
        self._train.append({**metrics, P.UPDATE_NORM: norm})
        row = self._client(node, metrics, client)
        for key in (
            P.NUM_EXAMPLES,
            P.ACC_BEFORE,
            P.ACC_AFTER,
            P.EPSILON,
            P.DELTA,
            P.SIGMA,
            P.BYTES_UP,
            P.TOTAL_STEPS,
        ):
            if key in metrics:
                row[key] = metrics[key]
        row["rounds"] = row.get("rounds", 0) + 1
        if P.PPL_BEFORE in metrics:  # the first round's value: the model before any personalization
            row.setdefault(P.PPL_BEFORE, metrics[P.PPL_BEFORE])
        if P.EPSILON in metrics:
            self.eps_history.setdefault(row["client"], []).append((rnd, float(metrics[P.EPSILON])))

    def eval_reply(self, rnd: int, node: int, metrics: dict[str, Any], client: int | None = None) -> None:
        """A personalized evaluation reply."""
        self._eval.append(metrics)
        row = self._client(node, metrics, client)
        row[P.EVAL_ACC] = metrics.get(P.EVAL_ACC)
        row["test-examples"] = metrics.get(P.NUM_EXAMPLES)
        row[P.MAJORITY_ACC] = metrics.get(P.MAJORITY_ACC, row.get(P.MAJORITY_ACC))
        for key in (P.PERPLEXITY, P.ENTITY_F1, P.MAJORITY_F1):  # the task's own scores, where it has them
            if key in metrics:
                row[key] = metrics[key]
        if P.EPSILON in metrics:
            row[P.EPSILON] = metrics[P.EPSILON]

    def rejection(self, rnd: int, node: int, reason: str) -> None:
        """A reply dropped by validation."""
        self._rejected.append(f"node {node}: {reason}")

    def refusal(self, rnd: int, node: int, reason: str) -> None:
        """A client that replied with an error (budget exhausted, damaged state, ...)."""
        self._refused.append(f"node {node}: {reason}")

    def train_summary(self, rnd: int) -> dict[str, float]:
        """Aggregated train metrics of the round so far."""
        out: dict[str, float] = {
            "accepted": float(len(self._train)),
            "rejected": float(len(self._rejected)),
            "refused": float(len(self._refused)),
        }
        for key in (P.ACC_BEFORE, P.ACC_AFTER, P.LOSS):
            vals = [float(m[key]) for m in self._train if key in m]
            if vals:
                out[f"{key}-mean"] = float(np.mean(vals))
        eps = [float(m[P.EPSILON]) for m in self._train if P.EPSILON in m]
        if eps:
            out["epsilon-max"] = max(eps)
        ups = [float(m[P.BYTES_UP]) for m in self._train if P.BYTES_UP in m]
        if ups:
            out["bytes-up-per-client"] = float(np.mean(ups))
        return out

    def end_round(self, rnd: int, seconds: float) -> dict[str, float]:
        """Write the round's line to metrics.jsonl and reset; returns the evaluation summary."""
        line: dict[str, Any] = {"round": rnd, "seconds": seconds, **self.train_summary(rnd)}
        accs = [float(m[P.EVAL_ACC]) for m in self._eval if P.EVAL_ACC in m]
        summary = distribution(accs, "eval-acc")
        for key in (P.PERPLEXITY, P.ENTITY_F1):
            summary.update(distribution([float(m[key]) for m in self._eval if key in m], key))
        line.update(summary)
        if self._rejected:
            line["rejections"] = self._rejected
        if self._refused:
            line["refusals"] = self._refused
        self.rounds.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        write_json_atomic(self.state_path, {"clients": self.clients, "eps_history": self.eps_history})
        for listener in list(ROUND_LISTENERS):
            listener({**line, "total_rounds": self.total_rounds})
        self._train, self._eval, self._rejected, self._refused = [], [], [], []
        return summary
