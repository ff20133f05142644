"""Simulation-speed benchmark: one federated workload through three runners, each in a fresh process.

(a) fedpers on Flower's simulation engine (Ray actors, the real ServerApp/ClientApp, encrypted client
state, reply validation, ledger, checkpoints); (b) the same client code in a plain sequential loop with
no framework (the floor: the sum of local compute); (c) Apple's pfl-research with the same model, data
split, optimizer and evaluation. Workload: non-private ``fedavg`` (pfl has no per-client DP-SGD with a
persistent accountant), every client trains and is evaluated every round.

Cold start = time from launching the process until round 1 ends, minus one steady round (median of the
later rounds): interpreter and imports, engine start-up, model load, feature extraction. The imports
(torch, transformers, peft, and flwr/ray or pfl) are also reported on their own.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from simulations.bench.fresh_process import call_fresh

WORKLOAD: dict[str, Any] = {
    "task.dataset": "tweets",
    "task.train-size": 200,
    "task.test-size": 100,
    "fed.num-rounds": 4,
    "dp.enabled": False,
    "personalization.mode": "fedavg",
}
RUNNERS = ("sequential", "flower", "pfl")
TARGET_RATIO_FLOOR, TARGET_COLD_START = 1.25, 8.0


def _child(
    runner: str,
    clients: int,
    threads: int,
    actors: int,
    out: str | Path,
    launched: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one runner in this process; timestamps are seconds since ``launched`` (epoch)."""
    import importlib

    heavy = {
        "sequential": "simulations.sequential",
        "flower": "simulations.run",
        "pfl": "simulations.bench.pfl_runner",
    }
    if runner not in heavy:
        raise ValueError(f"unknown runner {runner!r}; choose from {', '.join(RUNNERS)}")
    importlib.import_module(heavy[runner])  # torch, transformers, peft (+ flwr/ray or pfl): timed apart
    if runner == "flower":
        importlib.import_module("flwr.simulation")
    entered = time.time()
    ends: list[float] = []
    over = {**WORKLOAD, **(extra or {})}
    if runner == "sequential":
        from simulations.sequential import run_sequential

        summary = run_sequential(
            {**over, "train.threads": threads},
            clients,
            Path(out),
            on_round=lambda _line: ends.append(time.time()),
        )
        acc = float(summary["acc-mean"])
    elif runner == "flower":
        from simulations.run import SimSettings, simulate

        cpus = (os.cpu_count() or 1) / actors
        settings = SimSettings(
            num_clients=clients, client_cpus=cpus, overrides={**over, "train.threads": max(1, int(cpus))}
        )
        summary = simulate(settings, Path(out), on_round=lambda _line: ends.append(time.time()))
        acc = float(summary["acc-mean"])
    elif runner == "pfl":
        from simulations.bench.pfl_runner import run_pfl

        start = time.perf_counter()
        result = run_pfl(over, clients, threads=threads)
        offset = entered - start  # perf_counter → epoch
        ends = [offset + start + result["cold-start-seconds"]]
        for secs in result["round-seconds"][1:]:
            ends.append(ends[-1] + secs)
        acc = float(result["acc-mean"])
    done = time.time()
    rounds = [ends[0] - entered] + [b - a for a, b in zip(ends, ends[1:], strict=False)]
    steady = statistics.median(rounds[1:]) if len(rounds) > 1 else 0.0
    return {
        "runner": runner,
        "imports-seconds": entered - launched,
        "round-seconds": rounds,
        "steady-round-seconds": steady,
        "cold-start-seconds": ends[0] - launched - steady,
        "wall-seconds": done - launched,
        "acc-mean": acc,
    }


def run_runner(
    runner: str, clients: int, threads: int, actors: int, out: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Launch ``runner`` in a fresh Python process and return its timings (``extra``: more overrides)."""
    launched = time.time()
    result = call_fresh(
        "simulations.bench.sim_speed", "_child", runner, clients, threads, actors, str(out), launched,
        extra or {}, what=f"runner {runner}",
    )  # fmt: skip
    result["process-seconds"] = time.time() - launched
    result["actors" if runner == "flower" else "threads"] = actors if runner == "flower" else threads
    return result


def serialization_seconds(repeats: int = 20) -> float:
    """Seconds to encode + decode one fedavg train reply (arrays + metrics) with Flower's protobuf serde."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from common import protocol as P
    from common.config import Config
    from common.params import get_arrays, to_record
    from common.split import split_names
    from common.tasks import get_backbone

    cfg = Config.from_run_config(WORKLOAD)
    backbone = get_backbone(cfg)
    names = split_names([n for n, _ in backbone.template.named_parameters()], "fedavg")["shared"]
    content = RecordDict({P.ARRAYS: to_record(get_arrays(backbone.template, names))})
    start = time.perf_counter()
    for _ in range(repeats):
        recorddict_from_proto(recorddict_to_proto(content))
    return (time.perf_counter() - start) / repeats


def sim_speed_table(rows: list[dict[str, Any]], clients: int, ser_seconds: float) -> str:
    """Markdown table of the runners, the ratios and the targets, and where Flower's overhead goes."""
    from simulations.bench.output import markdown_table

    def label(r: dict[str, Any]) -> str:
        if r["runner"] == "flower":
            cache = f", feature cache {r['feature-cache']}" if r.get("feature-cache") else ""
            return f"(a) fedpers on Flower, {r['actors']} actor(s){cache}"
        name = "(b) sequential loop (floor)" if r["runner"] == "sequential" else "(c) pfl-research"
        return f"{name}, {r['threads']} thread(s)"

    body = markdown_table(
        ("runner", "wall s", "imports s", "cold start s", "steady round s", "acc mean"),
        [
            (label(r), f"{r['wall-seconds']:.1f}", f"{r['imports-seconds']:.1f}",
             f"{r['cold-start-seconds']:.1f}", f"{r['steady-round-seconds']:.2f}", f"{r['acc-mean']:.3f}")
            for r in rows
        ],
    )  # fmt: skip
    flowers = [r for r in rows if r["runner"] == "flower" and not r.get("feature-cache")]
    warm = next((r for r in rows if r.get("feature-cache") == "read"), None)
    seq = next((r for r in rows if r["runner"] == "sequential"), None)
    pfl = next((r for r in rows if r["runner"] == "pfl"), None)
    lines = [body, ""]
    if flowers and seq:
        a = min(flowers, key=lambda r: r["wall-seconds"])
        ratio_b = a["wall-seconds"] / seq["wall-seconds"]
        ok = "met" if ratio_b <= TARGET_RATIO_FLOOR else "MISSED"
        lines.append(
            f"- a/b (best Flower config / floor) = **{ratio_b:.2f}** (target ≤ {TARGET_RATIO_FLOOR}: {ok})"
        )
        if pfl:
            ratio_c = a["wall-seconds"] / pfl["wall-seconds"]
            verdict = "met" if ratio_c <= 1 else "MISSED"
            lines.append(f"- a/c (Flower / pfl-research) = **{ratio_c:.2f}** (target ≤ 1: {verdict})")
        cold = a["cold-start-seconds"]
        lines.append(
            f"- Flower round-1 cold start {cold:.1f} s (target ≤ {TARGET_COLD_START} s: "
            f"{'met' if cold <= TARGET_COLD_START else 'MISSED'}); "
            f"the floor's {seq['cold-start-seconds']:.1f} s "
            f"(imports {seq['imports-seconds']:.1f} s + model load and feature extraction): Flower adds "
            f"{cold - seq['cold-start-seconds']:.1f} s (imports {a['imports-seconds']:.1f} s, Ray start-up, "
            "the same imports and model load again in each actor)"
        )
        if warm:
            cold = warm["cold-start-seconds"]
            vs_pfl = ""
            if pfl:
                vs_pfl = f" (a/c {warm['wall-seconds'] / pfl['wall-seconds']:.2f}; pfl has no such cache)"
            lines.append(
                f"- with the feature cache read (`client.feature-cache`, a second run on the same data: the "
                f"frozen prefix is not run again): Flower cold start {cold:.1f} s (target ≤ "
                f"{TARGET_COLD_START} s: {'met' if cold <= TARGET_COLD_START else 'MISSED'}), wall "
                f"{warm['wall-seconds']:.1f} s{vs_pfl}"
            )
        per_round = a["steady-round-seconds"] - seq["steady-round-seconds"]
        msgs = 4 * clients  # train + evaluate, each a message and a reply
        lines.append(
            f"- steady round: Flower {a['steady-round-seconds']:.2f} s vs floor "
            f"{seq['steady-round-seconds']:.2f} s "
            f"(Δ {per_round:+.2f} s); protobuf encode+decode of one fedavg reply {1000 * ser_seconds:.1f} ms "
            f"× {msgs} messages = {msgs * ser_seconds:.2f} s per round at most"
        )
    return "\n".join(lines) + "\n"
