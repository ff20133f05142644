"""One round loop: ``fedpers simulate --sequential`` runs the same federation as the Flower path.

The plain loop is ``server.app.run_federation`` over an in-process grid of real ClientApps
(simulations.local_grid), so it honours ``[mode.*]`` tables and gives the same clients the same results.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from server import checkpoint

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}

# Non-private (so nothing draws fresh OS entropy), one torch thread (so sums run in one order).
CONFIG = """
[simulation]
num-clients = 3

[run-config]
"model.name" = "tiny"
"model.frozen-layers" = 1
"task.train-size" = 60
"task.test-size" = 30
"task.dirichlet-alpha" = 0.3
"train.batch-size" = 20
"train.threads" = 1
"fed.num-rounds" = 2
"dp.enabled" = false

[mode.fedper]
"train.lr-head" = 0.37
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG)
    return path


def _accuracies(run: Path) -> dict[int, float]:
    with (run / "clients.csv").open() as fh:
        return {int(r["client"]): float(r["eval-acc"]) for r in csv.DictReader(fh)}


def test_sequential_honours_the_mode_table(tmp_path: Path) -> None:
    args = ["simulate", "-c", str(_config(tmp_path)), "--sequential", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--set", "fed.num-rounds=1"])
    assert result.exit_code == 0, result.output
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())["run_config"]
    assert run_config["train.lr-head"] == 0.37 and run_config["fed.num-rounds"] == 1
    assert sorted(_accuracies(tmp_path / "run")) == [0, 1, 2]  # keyed by partition, as the Flower path


@pytest.mark.slow  # fedpers simulate in a fresh process (its log.txt holds the SecAgg+ lines)
def test_sequential_runs_secure_aggregation_too(tmp_path: Path) -> None:
    """SecAgg+ (Flower's legacy workflow) runs over the in-process grid: every round aggregated masked."""
    run = tmp_path / "run"
    argv = [
        str(BIN / "fedpers"),
        "simulate",
        "-c",
        str(_config(tmp_path)),
        "--sequential",
        "--run-dir",
        str(run),
    ]
    for key in ("secagg.enabled=true", "fed.min-clients=3", "fed.num-rounds=2"):
        argv += ["--set", key]
    done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["accepted"]) for x in lines] == [(1, 3.0), (2, 3.0)]
    assert (run / "log.txt").read_text().count("SecAgg+ over 3 of 3 clients") == 2


@pytest.mark.slow  # a Ray simulation in a fresh process
def test_sequential_and_flower_give_the_same_clients_the_same_results(tmp_path: Path) -> None:
    config = _config(tmp_path)
    runs = {}
    for name, extra in (("flower", []), ("sequential", ["--sequential"])):
        runs[name] = tmp_path / name
        argv = [str(BIN / "fedpers"), "simulate", "-c", str(config), "--run-dir", str(runs[name]), *extra]
        done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    flower, sequential = _accuracies(runs["flower"]), _accuracies(runs["sequential"])
    assert sorted(flower) == [0, 1, 2] and sequential == flower
    final = {name: checkpoint.load(run / "checkpoint") for name, run in runs.items()}
    a, b = final["flower"], final["sequential"]
    assert a is not None and b is not None and a.server_round == b.server_round == 2
    assert sorted(a.arrays) == sorted(b.arrays)
    # The same replies, averaged in float64 and rounded to float32. Ray returns replies in the order they
    # finish, the plain loop in partition order, so the float64 sums differ in their last bits, and about 1 %
    # of the elements round to the neighbouring float32 (measured: ≤ 2.3e-13 absolute on tensors of scale
    # 1e-6, i.e. about 1 float32 ulp of the tensor's scale; near-zero sums of opposite updates look larger in
    # relative terms).
    for name in a.arrays:
        scale = float(np.abs(a.arrays[name]).max())
        np.testing.assert_allclose(a.arrays[name], b.arrays[name], rtol=1e-6, atol=1e-6 * scale)
