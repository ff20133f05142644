"""The same federated workload as a plain sequential loop, with no framework.

It calls the very same client logic (``client.node.run_train`` / ``run_evaluate``) and the server's
weighted average, one client after the other, in one process. Uses: the floor for the simulation-speed
benchmark (Σ local compute), and quick hyper-parameter sweeps without Ray start-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.node import NodeInfo, run_evaluate, run_train
from common import protocol as P
from common.config import Config
from common.data import label_names
from common.model import get_backbone
from common.params import get_arrays, nbytes
from common.runs import client_cache_dir
from common.split import split_names
from server.ledger import Ledger, ledger_meta
from server.recorder import distribution
from server.server_opt import ServerOptimizer
from server.validation import weighted_average


def run_sequential(
    overrides: Mapping[str, Any],
    num_clients: int,
    out: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    evaluate_every: int = 1,
    limits: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``fed.num-rounds`` rounds over all clients; returns per-round lines and a final summary.

    Clients are evaluated every ``evaluate_every`` rounds and always after the last one. Every train
    reply's privacy report goes into ``out/ledger.json`` exactly as the server's ledger records it.
    ``limits``: the simulated devices' own privacy limits (``[simulation]`` max-epsilon, delta,
    allow-no-dp).
    """
    if evaluate_every < 1:
        raise ValueError(f"evaluate_every must be >= 1, got {evaluate_every}")
    cfg = Config.from_run_config(dict(overrides))
    backbone = get_backbone(cfg, len(label_names(cfg.task)))
    names = split_names([n for n, _ in backbone.template.named_parameters()], cfg.personalization.mode)
    shared = get_arrays(backbone.template, names["shared"])
    server_opt = ServerOptimizer.from_config(cfg)
    run_id = int(time.time())
    states = out / "clients"
    lim = dict(limits or {})
    cap = float(lim["max-epsilon"]) if lim.get("max-epsilon") else None
    delta, no_dp = float(lim.get("delta", 0.0)), bool(lim.get("allow-no-dp", True))
    nodes = [
        NodeInfo(
            i,
            num_clients,
            states / f"client-{i:04d}",
            run_id,
            feature_cache=client_cache_dir(cfg, i),
            max_epsilon=cap,
            delta=delta,
            allow_no_dp=no_dp,
        )  # fmt: skip
        for i in range(num_clients)
    ]
    ledger = Ledger(
        out / "ledger.json", {**ledger_meta(cfg), "mode": cfg.personalization.mode, "runner": "sequential"}
    )
    lines: list[dict[str, Any]] = []
    start = time.perf_counter()
    final: list[dict[str, Any]] = []
    for rnd in range(1, cfg.fed.num_rounds + 1):
        t0 = time.perf_counter()
        replies = [run_train(cfg, node, shared, rnd) for node in nodes]
        for node, (_, metrics) in zip(nodes, replies, strict=True):
            ledger.record(rnd, node.partition_id, "accepted", metrics)
        ledger.save()
        if names["shared"]:
            aggregate = weighted_average([(a, float(m[P.NUM_EXAMPLES])) for a, m in replies], names["shared"])
            shared = server_opt.step(shared, aggregate)
        final_round = rnd == cfg.fed.num_rounds
        line: dict[str, float] = {"round": rnd}
        after = [float(m[P.ACC_AFTER]) for _, m in replies if P.ACC_AFTER in m]
        if after:
            line.update(distribution(after, "acc-after"))
        evals: list[dict[str, Any]] = []
        if final_round or rnd % evaluate_every == 0:
            evals = [dict(run_evaluate(cfg, node, shared, final_round)) for node in nodes]
            line.update(distribution([float(e[P.EVAL_ACC]) for e in evals], "eval-acc"))
            final = evals
            for node, e in zip(nodes, evals, strict=True):
                if (
                    P.STEPS in e and P.EPSILON in e
                ):  # fedavg-ft fine-tuned under DP: spent budget, as the server
                    ledger.record(rnd, node.partition_id, "finetune", e)  # records it
            ledger.save()
        line["seconds"] = time.perf_counter() - t0
        eps = [float(m[P.EPSILON]) for _, m in replies if P.EPSILON in m]
        eps += [float(e[P.EPSILON]) for e in evals if P.EPSILON in e]  # includes a final fine-tune's spend
        if eps:
            line["epsilon-max"] = max(eps)
        lines.append(line)
        if on_round:
            on_round(line)
    summary: dict[str, Any] = {"mode": cfg.personalization.mode, "seconds": time.perf_counter() - start}
    summary.update(distribution([float(e[P.EVAL_ACC]) for e in final], "acc"))
    summary.update(distribution([float(e[P.MAJORITY_ACC]) for e in final if P.MAJORITY_ACC in e], "majority"))
    summary["bytes-up-per-client-round"] = float(nbytes(shared))
    summary["clients"] = [
        {"client": int(e[P.PARTITION_ID]), "acc": float(e[P.EVAL_ACC])}
        | ({"majority": float(e[P.MAJORITY_ACC])} if P.MAJORITY_ACC in e else {})  # none for a causal LM
        for e in final
    ]
    ppl = [float(e[P.PERPLEXITY]) for e in final if P.PERPLEXITY in e]
    if ppl:  # a causal LM: per-user perplexity on the evaluated split (lower is better)
        summary.update(distribution(ppl, "perplexity"))
        for row, e in zip(summary["clients"], final, strict=True):
            row["ppl"] = float(e[P.PERPLEXITY])
    summary["rounds"] = lines
    summary["epsilon-max"] = float(np.max([ln.get("epsilon-max", 0.0) for ln in lines]))
    return summary
