"""Paired per-client comparisons: the interval, the counts, the relative form, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from common import protocol as P
from simulations.compare import write_paired
from simulations.paired import main, paired, paired_table, read_clients


def test_a_constant_gain_on_every_client_is_exact_and_significant() -> None:
    rng = np.random.default_rng(1)
    b = {i: float(v) for i, v in enumerate(rng.uniform(0.5, 0.9, 30))}
    a = {i: v + 0.02 for i, v in b.items()}
    p = paired(a, b, lower_is_better=False)
    assert (p.n, p.better, p.worse) == (30, 30, 0)
    for stat in ("mean", "p10", "p90"):  # a shift moves every statistic by exactly the shift
        assert p.diff[stat] == pytest.approx(0.02)
        assert p.low[stat] == pytest.approx(0.02) and p.high[stat] == pytest.approx(0.02)
    assert p.significant("mean")


def test_noise_around_zero_is_not_significant_and_lower_is_better_flips_the_counts() -> None:
    rng = np.random.default_rng(2)
    b = {i: float(v) for i, v in enumerate(rng.uniform(50, 150, 40))}
    a = {i: v + float(rng.normal(0, 5)) for i, v in b.items()}
    p = paired(a, b, lower_is_better=True)
    assert p.low["mean"] < 0 < p.high["mean"] and not p.significant("mean")
    lower = sum(a[i] < b[i] for i in b)
    assert p.better == lower and p.worse == 40 - lower  # better = lower perplexity


def test_relative_comparison_reports_the_ratio() -> None:
    b = {i: 80.0 + 3 * i for i in range(20)}
    a = {i: v * 1.01 for i, v in b.items()}  # 1 % worse perplexity for every user
    p = paired(a, b, lower_is_better=True, relative=True)
    assert p.diff["mean"] == pytest.approx(0.01) and p.diff["p10"] == pytest.approx(0.01)
    assert p.low["mean"] == pytest.approx(0.01) and (p.better, p.worse) == (0, 20)


def test_only_common_clients_are_paired_and_bad_input_is_refused() -> None:
    p = paired({0: 0.5, 1: 0.6, 2: 0.7, 9: 0.1}, {0: 0.4, 1: 0.5, 2: 0.6}, lower_is_better=False)
    assert p.n == 3 and p.diff["mean"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 2 clients"):
        paired({0: 1.0, 1: 2.0}, {1: 1.0, 2: 2.0}, lower_is_better=True)
    with pytest.raises(ValueError, match="positive"):
        paired({0: 1.0, 1: 0.0}, {0: 1.0, 1: 2.0}, lower_is_better=True, relative=True)
    with pytest.raises(ValueError, match="finite"):
        paired({0: 1.0, 1: float("nan")}, {0: 1.0, 1: 2.0}, lower_is_better=True)
    with pytest.raises(ValueError, match="resamples"):
        paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}, lower_is_better=True, resamples=10)


def _csv(path: Path, ppl: list[float]) -> None:
    path.mkdir(parents=True)
    with (path / "clients.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["client", "eval-acc", "perplexity"])
        for i, v in enumerate(ppl):
            w.writerow([i, 0.3, v])


def test_compare_folder_table_from_csv_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _csv(tmp_path / "fedper", [90.0, 100.0, 110.0, 120.0])
    _csv(tmp_path / "local", [91.0, 101.0, 111.0, 121.0])
    (tmp_path / "fedavg").mkdir()  # the sequential runner's summary.json rows
    rows = [{"client": i, "acc": 0.3, "ppl": v} for i, v in enumerate([89.0, 99.0, 109.0, 119.0])]
    (tmp_path / "fedavg" / "summary.json").write_text(json.dumps({"clients": rows}))
    assert read_clients(tmp_path / "fedavg") == (
        {0: 89.0, 1: 99.0, 2: 109.0, 3: 119.0},
        P.SCORES[0],
    )
    text = paired_table(tmp_path, ["fedper", "local", "fedavg"], "fedper")
    assert "| fedper vs local | 4 | 4 / 0 |" in text and "| fedper vs fedavg | 4 | 0 / 4 |" in text
    assert write_paired(tmp_path, ("fedper",)) is None  # one mode: nothing to pair
    path = write_paired(tmp_path, ("fedper", "local"))
    assert path is not None and "fedper vs local" in path.read_text()
    assert main(["--run-dir", str(tmp_path), "--base", "fedper"]) == 0
    assert "fedper vs fedavg" in capsys.readouterr().out
    assert main(["--run-dir", str(tmp_path), "--base", "ffa"]) == 2
    assert "not among the compared modes" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path / "missing")]) == 2
