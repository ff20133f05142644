"""``fedpers simulate``'s console: progress, warnings once and the results; the rest in <run>/log.txt."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.run_log import WarningsOnce, is_ours

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    *("--compare", "fedper", "--clients", "2", "--set", "model.name=tiny", "--set", "model.frozen-layers=1"),
    *("--set", "fed.num-rounds=1", "--set", "task.train-size=40", "--set", "task.test-size=20"),
    *("--set", "train.batch-size=20"),
]


def _simulate(run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    argv = [str(BIN / "fedpers"), "simulate", "-c", str(ROOT / "simulations/configs/demo.toml")]
    argv += [*TINY_RUN, "--run-dir", str(run_dir), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=run_dir.parent)


@pytest.mark.slow  # fedpers simulate in a fresh process
def test_a_quiet_run_shows_progress_and_results_and_logs_the_rest(tmp_path: Path) -> None:
    res = _simulate(tmp_path / "run")
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-3000:]
    assert len(console.splitlines()) < 20, console
    assert "| fedper |" in console and "1/1" in console
    assert "INFO" not in console and "Warning" not in console and "pid=" not in console
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "INFO" in log and "Starting FedpersStrategy" in log  # Flower's logger
    assert "(ClientAppActor pid=" in log  # what Ray forwards from the actor processes
    assert f"log: {tmp_path / 'run' / 'log.txt'}" in console


@pytest.mark.slow  # fedpers simulate in a fresh process
def test_verbose_shows_flowers_log_on_the_console(tmp_path: Path) -> None:
    res = _simulate(tmp_path / "run", "--verbose")
    assert res.returncode == 0, res.stderr[-3000:]
    console = res.stdout + res.stderr
    assert "INFO" in console and "Starting FedpersStrategy" in console and "| fedper |" in console
    assert "Starting FedpersStrategy" in (tmp_path / "run" / "log.txt").read_text()


@pytest.mark.slow  # fedpers simulate in a fresh process
def test_a_failed_quiet_run_is_one_line_that_points_to_the_log(tmp_path: Path) -> None:
    """No reply arrives within a 1 s round (the actors' cold start alone takes longer): one error line."""
    res = _simulate(tmp_path / "run", "--set", "fed.round-timeout=1")
    console = res.stdout + res.stderr
    assert res.returncode == 2, console[-3000:]
    errors = [line for line in console.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no client took part" in errors[0], console
    log = Path(errors[0].rsplit("the full log is in ", 1)[1])
    assert log in (tmp_path / "run" / "log.txt", tmp_path / "run.log.txt")
    assert "Starting FedpersStrategy" in log.read_text()
    assert "Traceback" not in console and len(console.splitlines()) < 10, console


def test_only_fedpers_warnings_are_shown_each_kind_once() -> None:
    shown: list[str] = []
    handler = WarningsOnce(shown.append)

    def record(path: str, message: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("flwr", logging.WARNING, path, 1, message, args, None)

    ours = str(ROOT / "server" / "strategy.py")
    assert is_ours(ours) and not is_ours(str(ROOT.parent / "flwr" / "server.py"))
    handler.emit(record(ours, "round %d: node %d refused: eps %.2f", 1, 7, 0.5))
    handler.emit(record(ours, "round %d: node %d refused: eps %.2f", 2, 9, 1.25))
    handler.emit(record(ours, "round %d: reply of node %d rejected", 2, 9))
    handler.emit(record("/site-packages/flwr/simulation/run.py", "DEPRECATED FEATURE"))
    assert shown == ["round 1: node 7 refused: eps 0.50", "round 2: reply of node 9 rejected"]
