"""README "Your own data" runs as written (only the run folder moved to a temporary one), and the free-text
example (task.dataset = "text-file") simulates on Flower's engine."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # README commands and a Flower simulation in fresh processes

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
}


def _readme_commands(section: str) -> list[str]:
    """The command lines of the bash blocks in README section ``section`` (up to the next ``## ``)."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    assert blocks, f"README section {section!r} has no bash block"
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def _run(command: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_readme_own_data_example_runs_as_written(tmp_path: Path) -> None:
    commands = _readme_commands("Your own data")
    assert [c.split()[:2] for c in commands] == [
        ["fedpers", "simulate"],
        ["cat", "runs/reviews/report.md"],
        ["fedpers", "predict"],
        ["fedpers", "audit"],
    ]
    run = tmp_path / "reviews"
    out = [_run(c.replace("runs/reviews", str(run))) for c in commands]
    assert "data: simulations/data/sample-reviews.csv: 4 of 5 users taken" in out[0].stderr
    assert "1 with fewer than task.min-examples rows left out" in out[0].stderr
    assert "| 0 | ana |" in out[1].stdout and "| 3 | dev |" in out[1].stdout
    with (run / "clients.csv").open() as fh:
        assert [r["user"] for r in csv.DictReader(fh)] == ["ana", "ben", "chloe", "dev"]
    assert json.loads((run / "clients" / "users.json").read_text())["client-0000"] == "ana"
    assert re.search(r"│ (neg|pos) +│", out[2].stdout), out[2].stdout
    assert "PASS: 4 clients" in out[3].stdout + out[3].stderr


def test_free_text_simulates_on_flower(tmp_path: Path) -> None:
    run = tmp_path / "texts"
    config = "simulations/configs/text-file.toml"
    result = _run(f"fedpers simulate -c {config} --clients 2 --run-dir {run}")
    assert "2 of 3 users taken, largest first: gran (9), priya (9)" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["clients"] == 2 and summary["rounds"] == 2 and summary["perplexity-mean"] > 1.0
    with (run / "clients.csv").open() as fh:
        assert [r["user"] for r in csv.DictReader(fh)] == ["gran", "priya"]
