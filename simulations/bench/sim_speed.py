"""Simulation-speed benchmark: one federated workload through three runners, interleaved and repeated.

Runners, each run in a fresh process (clean imports, caches and memory):

(a) ``flower``: fedpers on Flower's simulation engine (Ray actors, the real ServerApp/ClientApp,
    encrypted client state, reply validation, ledger, checkpoints). Its configuration (actors, and the
    cores split among them as torch threads) is chosen first by a separate, labelled probe: one run per
    candidate, the fastest wins, and only that configuration enters the timed comparison.
(b) ``floor``: the same workload as bare compute in one process (simulations.bench.floor: the clients'
    own features, one model, the same local steps, server step and evaluation schedule, nothing else).
(c) ``pfl``: Apple's pfl-research with the same model, features, optimizer, cohorts, DP mechanism and
    evaluation, run as its docs recommend for several cores: one worker process per core under
    ``torchrun --standalone --nnodes=1 --nproc_per_node=W`` with one torch thread each (W = 1: a
    single process, labelled so).
(d) ``sequential`` (optional): fedpers' real client code over an in-process grid, no engine.

Fairness: the runners are interleaved (floor, flower, pfl, floor, flower, pfl, ...) for ``repeats``
rounds (3 by default), so a slow spell of the machine hits each alike; each runner is reported as the
median and min–max of its runs, and the ratios fedpers/floor and fedpers/pfl are taken from medians.

Workloads: ``classic`` (10 clients × 4 rounds of tweets, 200 train / 100 test each, non-private
``fedavg`` with LoRA + head, every client trains and is evaluated every round, each also before and
after its training) and ``cross-device`` (the issue-31 setting: N = 1000 users with 24 train / 12 test
tweets each, ``fixed-size`` partition with Dirichlet α = 1.0, the head-only model ``lora.r = 0``,
Poisson cohorts q = 0.05, central user-level DP with fixed S and z = 0.744, no sample-level DP,
evaluated only after the last round, no before/after reports).

Timings: ``wall`` = launch of the process until its work is done; ``steady round`` = the median round
between the first and the last (the first carries start-up, the last the final evaluation; with two
rounds, the last); ``cold start`` = launch until round 1 ends, minus one steady round: interpreter and
imports, engine start-up, model load and the first features. The imports (torch, transformers, peft,
and flwr/ray or pfl) are also reported on their own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from simulations.bench.fresh_process import call_fresh
from simulations.bench.output import BenchRun, markdown_table

WORKLOADS: dict[str, dict[str, Any]] = {
    "classic": {
        "task.dataset": "tweets",
        "task.train-size": 200,
        "task.test-size": 100,
        "fed.num-rounds": 4,
        "dp.enabled": False,
        "personalization.mode": "fedavg",
    },
    "cross-device": {
        "task.dataset": "tweets",
        "task.partitioner": "fixed-size",
        "task.dirichlet-alpha": 1.0,
        "task.train-size": 24,
        "task.test-size": 12,
        "lora.r": 0,
        "fed.num-rounds": 20,
        "fed.evaluate-every": 20,
        "fed.fraction-train": 0.05,
        "dp.enabled": False,
        "dp.user-level": True,
        "dp.user-noise-multiplier": 0.744,
        "dp.user-clipping-norm": 0.1,
        "dp.user-clipping": "fixed",
        "dp.user-epsilon": 0.0,
        "client.report-before-after": False,
        "personalization.mode": "fedavg",
    },
}
CLIENTS = {"classic": 10, "cross-device": 1000}
WORKLOAD = WORKLOADS["classic"]
RUNNERS = ("floor", "flower", "pfl", "sequential")
DEFAULT_RUNNERS = ("floor", "flower", "pfl")
# Targets: fedpers' median wall over the floor's, and Flower's round-1 cold start (None: no target).
# Classic: the engine issue's; cross-device: issue #31's (the frozen encoder's forward pass is in every
# runner's wall there, as it is in a real federation).
TARGETS: dict[str, dict[str, float | None]] = {
    "classic": {"floor": 1.25, "cold-start": 8.0},
    "cross-device": {"floor": 1.5, "cold-start": None},
}
_MODULES = {
    "floor": "simulations.bench.floor",
    "sequential": "simulations.sequential",
    "flower": "simulations.run",
    "pfl": "simulations.bench.pfl_runner",
}


def workload_overrides(workload: str, rounds: int | None = None) -> dict[str, Any]:
    """The run config of ``workload``; ``rounds`` replaces fed.num-rounds (and a set evaluate-every)."""
    if workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    over = dict(WORKLOADS[workload])
    if rounds is not None:
        if rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {rounds}")
        over["fed.num-rounds"] = rounds
        if "fed.evaluate-every" in over:
            over["fed.evaluate-every"] = rounds
    return over


def timings(
    runner: str, launched: float, entered: float, ends: Sequence[float], done: float
) -> dict[str, Any]:
    """A runner's timing row from epoch timestamps: launch, imports done, each round's end, work done."""
    if not ends:
        raise RuntimeError(f"runner {runner} reported no finished round")
    rounds = [ends[0] - entered] + [b - a for a, b in zip(ends, ends[1:], strict=False)]
    middle = rounds[1:-1] or rounds[1:]
    steady = statistics.median(middle) if middle else 0.0
    return {
        "runner": runner,
        "imports-seconds": entered - launched,
        "round-seconds": rounds,
        "steady-round-seconds": steady,
        "last-round-seconds": rounds[-1],
        "cold-start-seconds": ends[0] - launched - steady,
        "wall-seconds": done - launched,
    }


def _child(
    runner: str, clients: int, threads: int, actors: int, out: str | Path, launched: float,
    overrides: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Run one runner in this process; timestamps are seconds since ``launched`` (epoch)."""
    import importlib

    if runner not in _MODULES:
        raise ValueError(f"unknown runner {runner!r}; choose from {', '.join(RUNNERS)}")
    importlib.import_module(_MODULES[runner])  # torch, transformers, peft (+ flwr/ray or pfl): timed apart
    if runner == "flower":
        importlib.import_module("flwr.simulation")
    entered = time.time()
    ends, acc = _work(runner, clients, threads, actors, Path(out), overrides)
    return {**timings(runner, launched, entered, ends, time.time()), "acc-mean": acc}


def _work(
    runner: str, clients: int, threads: int, actors: int, out: Path, over: dict[str, Any]
) -> tuple[list[float], float]:
    """Run the workload with ``runner``; returns each round's end (epoch seconds) and the mean accuracy."""
    ends: list[float] = []
    if runner == "floor":
        from simulations.bench.floor import run_floor

        result = run_floor({**over, "train.threads": threads}, clients)
        return list(result["round-ends"]), float(result["acc-mean"])
    if runner == "sequential":
        from simulations.sequential import run_sequential

        summary = run_sequential(
            {**over, "train.threads": threads}, clients, out, on_round=lambda _l: ends.append(time.time())
        )
        return ends, float(summary["acc-mean"])
    if runner == "flower":
        from simulations.run import SimSettings, simulate

        cpus = (os.cpu_count() or 1) / actors
        over = {**over, "train.threads": flower_threads(actors)}
        settings = SimSettings(num_clients=clients, client_cpus=cpus, overrides=over)
        summary = simulate(settings, out, on_round=lambda _l: ends.append(time.time()))
        return ends, float(summary["acc-mean"])
    from simulations.bench.pfl_runner import run_pfl

    result = run_pfl(over, clients, threads=threads)
    return list(result["round-ends"]), float(result["acc-mean"])


def flower_threads(actors: int) -> int:
    """Torch threads per Flower actor: the cores split among the actors."""
    return max(1, int((os.cpu_count() or 1) / max(actors, 1)))


def _pfl_workers(
    over: dict[str, Any], clients: int, workers: int, launched: float, out: Path
) -> dict[str, Any]:
    """pfl under torchrun: ``workers`` processes on this machine, one torch thread each (pfl's docs).

    The launcher's and the workers' output is kept in ``out/torchrun.log``.
    """
    payload = json.dumps({"overrides": over, "clients": clients, "threads": 1})
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={workers}", "-m", "simulations.bench.pfl_runner", payload,
    ]  # fmt: skip
    env = {
        **os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1", "PFL_PYTORCH_DEVICE": "cpu",
    }  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "torchrun.log").write_text(f"{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"pfl under torchrun failed (exit {proc.returncode}; all output in {out / 'torchrun.log'}):\n"
            f"{proc.stderr[-3000:]}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    row = timings("pfl", launched, result["entered"], result["round-ends"], result["done"])
    return {**row, "acc-mean": float(result["acc-mean"]), "workers": int(result["workers"])}


def run_runner(
    runner: str,
    clients: int,
    threads: int,
    actors: int,
    out: Path,
    extra: dict[str, Any] | None = None,
    *,
    workload: str = "classic",
    workers: int = 1,
) -> dict[str, Any]:
    """Launch ``runner`` in a fresh process and return its timings (``extra``: more overrides).

    ``threads``: torch threads of the floor, the sequential runner and single-process pfl; ``actors``:
    Flower's actor count; ``workers``: pfl worker processes (above 1: torchrun, one thread each).
    """
    over = {**workload_overrides(workload), **(extra or {})}
    launched = time.time()
    if runner == "pfl" and workers > 1:
        result = _pfl_workers(over, clients, workers, launched, out)
    else:
        result = call_fresh(
            "simulations.bench.sim_speed", "_child", runner, clients, threads, actors, str(out), launched,
            over, what=f"runner {runner}",
        )  # fmt: skip
    result["process-seconds"] = time.time() - launched
    if runner == "flower":
        result.update({"actors": actors, "threads": flower_threads(actors)})
    elif runner == "pfl":
        result.update({"workers": max(workers, 1), "threads": 1 if workers > 1 else threads})
    else:
        result["threads"] = threads
    return result


def serialization_seconds(repeats: int = 20, overrides: Mapping[str, Any] | None = None) -> float:
    """Seconds to encode + decode one train reply's arrays with Flower's protobuf serde."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from common import protocol as P
    from common.config import Config
    from common.params import get_arrays, to_record
    from common.split import split_names
    from common.tasks import get_backbone

    cfg = Config.from_run_config(dict(overrides or WORKLOAD))
    backbone = get_backbone(cfg)
    names = [n for n, _ in backbone.template.named_parameters()]
    shared = split_names(names, cfg.personalization.mode)["shared"]
    content = RecordDict({P.ARRAYS: to_record(get_arrays(backbone.template, shared))})
    start = time.perf_counter()
    for _ in range(repeats):
        recorddict_from_proto(recorddict_to_proto(content))
    return (time.perf_counter() - start) / repeats


def schedule(runners: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """The interleaved order of the timed runs: every runner once per repeat, in the given order."""
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown or not runners or len(set(runners)) != len(runners):
        raise ConfigError(f"runners must be distinct names from {', '.join(RUNNERS)}, got {list(runners)}")
    return [(rep, runner) for rep in range(repeats) for runner in runners]


def choose_flower(probes: Sequence[Mapping[str, Any]]) -> int:
    """The actor count of the fastest probe run (by wall time)."""
    if not probes:
        raise ConfigError("no Flower probe run to choose from")
    return int(min(probes, key=lambda r: r["wall-seconds"])["actors"])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


STATS = ("wall-seconds", "cold-start-seconds", "steady-round-seconds", "last-round-seconds",
         "imports-seconds", "acc-mean")  # fmt: skip


def timed_runs(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The runs that enter the comparison: not a probe, not failed."""
    return [r for r in rows if not r.get("probe") and "error" not in r]


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per runner (in order of first appearance): its runs, label and the spread of every timing."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["runner"], []).append(row)
    return {
        runner: {
            "runs": len(runs),
            "label": label(runs[0]),
            **{key: spread([float(r[key]) for r in runs]) for key in STATS if all(key in r for r in runs)},
        }
        for runner, runs in groups.items()
    }


def ratios(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """fedpers (Flower) over the floor and over pfl, from median wall and median steady round."""
    out: dict[str, float] = {}
    if "flower" not in stats:
        return out
    a = stats["flower"]
    for other in ("floor", "pfl", "sequential"):
        if other in stats:
            for key, name in (("wall-seconds", "wall"), ("steady-round-seconds", "steady")):
                denominator = stats[other][key]["median"]
                if denominator > 0:
                    out[f"fedpers/{other} {name}"] = a[key]["median"] / denominator
    return out


def label(row: Mapping[str, Any]) -> str:
    """How a runner's configuration is shown."""
    runner = row["runner"]
    if runner == "flower":
        return f"(a) fedpers on Flower, {row['actors']} actor(s) × {row['threads']} thread(s)"
    if runner == "floor":
        return f"(b) floor (bare compute, 1 process × {row['threads']} thread(s))"
    if runner == "pfl":
        if row.get("workers", 1) > 1:
            return f"(c) pfl-research, {row['workers']} worker processes × 1 thread (torchrun)"
        return f"(c) pfl-research, single process × {row['threads']} thread(s)"
    return f"(d) fedpers clients in one process, no engine, {row['threads']} thread(s)"


def _cell(s: Mapping[str, float], digits: int) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def sim_speed_table(
    rows: list[dict[str, Any]], clients: int, ser_seconds: float, workload: str = "classic"
) -> str:
    """Markdown: each runner's median [min–max] over its timed runs, the ratios and ``workload``'s targets.

    ``rows``: every run; probe runs (``probe``) are listed apart and failed ones (``error``) named only.
    """
    stats = summarize(timed_runs(rows))
    body = markdown_table(
        ("runner", "runs", "wall s", "cold start s", "steady round s", "last round s", "imports s",
         "acc mean"),
        [
            (s["label"], s["runs"], _cell(s["wall-seconds"], 1), _cell(s["cold-start-seconds"], 1),
             _cell(s["steady-round-seconds"], 2), _cell(s["last-round-seconds"], 2),
             _cell(s["imports-seconds"], 1), f"{s['acc-mean']['median']:.3f}")
            for s in stats.values()
        ],
    )  # fmt: skip
    failed = [f"{r['run']}" for r in rows if "error" in r]
    lines = [body, *_probe_lines(rows), *_ratio_lines(stats, clients, ser_seconds, TARGETS[workload])]
    if failed:
        lines.append(f"- failed runs (left out; their errors are in result.json): {', '.join(failed)}")
    return "\n".join(lines).rstrip() + "\n"


def _probe_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    probes = [r for r in rows if r.get("probe") and "error" not in r]
    if not probes:
        return []
    chosen = choose_flower(probes)
    runs = "; ".join(
        f"{r['actors']} actor(s) × {r['threads']} thread(s) {r['wall-seconds']:.1f} s" for r in probes
    )
    return [
        f"Flower configuration probe (one run each, not in the comparison): {runs} → {chosen} actor(s).",
        "",
    ]


def _ratio_lines(
    stats: Mapping[str, Mapping[str, Any]], clients: int, ser_seconds: float, targets: Mapping[str, Any]
) -> list[str]:
    r = ratios(stats)
    lines = []
    if "fedpers/floor wall" in r:
        ok = "met" if r["fedpers/floor wall"] <= targets["floor"] else "MISSED"
        lines.append(
            f"- fedpers/floor (median wall) = **{r['fedpers/floor wall']:.2f}** (target ≤ "
            f"{targets['floor']}: {ok}); steady round {r.get('fedpers/floor steady', 0.0):.2f}"
        )
    if "fedpers/pfl wall" in r:
        ok = "met" if r["fedpers/pfl wall"] <= 1 else "MISSED"
        lines.append(
            f"- fedpers/pfl (median wall) = **{r['fedpers/pfl wall']:.2f}** (target ≤ 1: {ok}); steady "
            f"round {r.get('fedpers/pfl steady', 0.0):.2f}"
        )
    if "fedpers/sequential wall" in r:
        lines.append(f"- fedpers/sequential (median wall) = {r['fedpers/sequential wall']:.2f}")
    if "flower" in stats:
        cold, limit = stats["flower"]["cold-start-seconds"]["median"], targets["cold-start"]
        goal = "no target" if limit is None else f"target ≤ {limit} s: {'met' if cold <= limit else 'MISSED'}"
        lines.append(f"- Flower round-1 cold start (median) {cold:.1f} s ({goal})")
    if ser_seconds > 0:
        msgs = 4 * clients  # at most: train + evaluate, each a message and a reply, every client
        lines.append(
            f"- protobuf encode+decode of one reply's arrays {1000 * ser_seconds:.1f} ms × {msgs} messages "
            f"= {msgs * ser_seconds:.2f} s per round at most"
        )
    return lines


def workload_line(workload: str, clients: int, over: Mapping[str, Any]) -> str:
    """One sentence saying what the workload is."""
    rounds = over["fed.num-rounds"]
    sizes = f"{over['task.train-size']} train / {over['task.test-size']} test per client"
    if workload == "classic":
        return (
            f"Workload `classic`: {clients} clients × {rounds} rounds, tweets, {sizes}, non-private fedavg "
            "(LoRA + head), every client trains and is evaluated every round (and before/after training)."
        )
    return (
        f"Workload `cross-device`: {clients} users × {rounds} rounds, tweets (fixed-size, Dirichlet α "
        f"{over['task.dirichlet-alpha']}), {sizes}, head-only model (lora.r = 0), fedavg with central "
        f"user-level DP (S {over['dp.user-clipping-norm']}, z {over['dp.user-noise-multiplier']}), "
        f"Poisson cohorts q = {over['fed.fraction-train']} (pfl: fixed cohorts of "
        f"{max(1, round(over['fed.fraction-train'] * clients))}), evaluated after the last round only."
    )


def bench_sim_speed(
    workload: str = "classic",
    clients: int | None = None,
    *,
    rounds: int | None = None,
    repeats: int = 3,
    threads: int = 2,
    actors: Sequence[int] = (2, 1),
    pfl_workers: int = 2,
    runners: Sequence[str] = DEFAULT_RUNNERS,
    extra: Mapping[str, Any] | None = None,
    folder: Path | None = None,
    publish: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[BenchRun, str]:
    """Probe Flower's configuration, then run the interleaved, repeated comparison; save (and publish).

    Returns the BenchRun and its Markdown table. ``on_run`` sees each finished run's row; ``extra``:
    overrides on top of the workload (a smaller model for a smoke run).
    """
    from simulations.bench.commands import command_line

    over = {**workload_overrides(workload, rounds), **(extra or {})}
    clients = CLIENTS[workload] if clients is None else clients
    order = schedule(runners, repeats)
    if not actors or min(actors) < 1 or min(clients, pfl_workers, threads) < 1:
        raise ConfigError("clients, actors, pfl workers and threads must be at least 1")
    run = BenchRun(
        "sim-speed" if workload == "classic" else f"sim-speed-{workload}", command_line(), folder=folder
    )
    rows: list[dict[str, Any]] = []

    def one(runner: str, name: str, n_actors: int, probe: bool = False) -> None:
        try:
            row = run_runner(runner, clients, threads, n_actors, run.dir / name, over, workload=workload,
                             workers=pfl_workers)  # fmt: skip
        except RuntimeError as exc:  # one failed run is reported, the comparison goes on
            row = {"runner": runner, "error": str(exc)[-2000:]}
        rows.append({**row, "run": name, "probe": probe})
        run.results = {"workload": workload, "overrides": over, "clients": clients, "rows": rows}
        run.save(sim_speed_table(rows, clients, 0.0, workload))  # keep what finished
        if on_run:
            on_run(rows[-1])

    chosen = actors[0]
    if "flower" in runners and len(actors) > 1:
        for n in actors:
            one("flower", f"probe-flower-{n}", n, probe=True)
        chosen = choose_flower([r for r in rows if r["probe"] and "error" not in r])
    for rep, runner in order:
        one(runner, f"{runner}-{rep + 1}", chosen)
    ser = serialization_seconds(overrides=over) if "flower" in runners else 0.0
    stats = summarize(timed_runs(rows))
    run.results.update(
        {"serialization-seconds": ser, "flower-actors": chosen, "summary": stats, "ratios": ratios(stats)}
    )
    table = f"{workload_line(workload, clients, over)}\n\n{sim_speed_table(rows, clients, ser, workload)}"
    run.save(table)
    if publish:
        run.publish(table)
    return run, table
