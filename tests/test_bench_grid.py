"""The benchmark grid: cells run through the real sequential federation, resume, and aggregate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from simulations.bench.grid import Cell, load_done, read_ledger, run_grid, split_for_workers
from simulations.bench.output import BenchRun, markdown_table, update_block
from simulations.bench.quality import aggregate, ledger_check, plan, targets
from simulations.bench.quality_report import paired_vs_local

TINY = {
    "model.name": "tiny",
    "model.frozen-layers": 1,
    "task.train-size": 30,
    "task.test-size": 10,
    "train.batch-size": 15,
    "fed.num-rounds": 1,
}


def test_grid_runs_resumes_and_aggregates(tmp_path: Path) -> None:
    cells = [
        Cell(f"tweets-a0.3/{p}/{m}/seed0", {**TINY, **o, "personalization.mode": m}, 2, group=p)
        for p, o in (("none", {"dp.enabled": False}), ("eps8", {"dp.epsilon": 8.0}))
        for m in ("local", "fedper")
    ]
    seen: list[tuple[int, int]] = []
    done = run_grid(tmp_path, cells[:2], workers=1, on_progress=lambda d, t: seen.append((d, t)))
    assert sorted(done) == sorted(c.key for c in cells[:2]) and seen[-1] == (2, 2)
    first = (tmp_path / "cells" / f"{cells[0].key}.json").stat().st_mtime_ns
    done = run_grid(tmp_path, cells, workers=1)  # resumes: the two finished cells are not rerun
    assert len(done) == 4 and (tmp_path / "cells" / f"{cells[0].key}.json").stat().st_mtime_ns == first
    dp = done["tweets-a0.3/eps8/fedper/seed0"]
    kept = read_ledger(tmp_path, dp)
    assert kept is not None and not Path(dp["ledger"]).is_absolute()  # kept inside the run folder
    shutil.rmtree(tmp_path / "work")  # scratch: the kept results need nothing from it
    ledger = kept["entries"]
    assert max(e["epsilon"] for e in ledger) == dp["epsilon-max"] <= 8.0 + 1e-9
    assert ledger_check(tmp_path, load_done(tmp_path, cells)) == (2, 2)  # the two DP cells, both matching
    rows = aggregate(load_done(tmp_path, cells))
    assert {(r["privacy"], r["mode"]) for r in rows} == {
        (p, m) for p in ("none", "eps8") for m in ("local", "fedper")
    }
    verdicts = targets(rows, "tweets-a0.3")
    assert any("DP fedavg" in fig and "not run" in fig for _, fig, _ in verdicts)
    paired_verdicts = targets(rows, "tweets-a0.3", load_done(tmp_path, cells))  # the same 2 clients pair
    local_dp = next(fig for t, fig, _ in paired_verdicts if "p10 ≥ DP local" in t)
    assert "paired over 2 clients: 95 % CI [" in local_dp
    against = paired_vs_local(load_done(tmp_path, cells), "tweets-a0.3")
    assert [row[:2] for row in against] == [("ε=8", "fedper")]  # no fedsa/ffa cells, no DP-free rows
    assert against[0][3].endswith("]") and "pts [" in against[0][3]


def test_plan_orders_by_priority_and_rejects_unknown_names() -> None:
    cells = plan(["news"], ["eps1", "none", "eps8"], ["fedper"], [0, 1], {"default": {"train.lr-head": 0.7}})
    assert [c.key for c in cells][:3] == [
        "news/eps8/fedper/seed0",
        "news/none/fedper/seed0",
        "news/eps1/fedper/seed0",
    ]
    assert cells[0].overrides["train.lr-head"] == 0.7 and cells[0].overrides["dp.epsilon"] == 8.0
    with pytest.raises(ValueError, match="unknown setting"):
        plan(["tweets"], ["eps8"], ["fedper"], [0], {})
    with pytest.raises(ValueError, match="unknown mode"):
        plan(["news"], ["eps8"], ["fedbias2"], [0], {})


def test_publish_replaces_only_its_block(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(
        "# Benchmarks\n\nanalysis stays\n\n<!-- bench:comm -->\nold\n<!-- /bench:comm -->\n\ntail\n"
    )
    run = BenchRun("comm", "fedpers bench comm", root=tmp_path)
    run.publish(markdown_table(("a", "b"), [(1, 0.5)]), md)
    text = md.read_text()
    assert "old" not in text and "| 1 | 0.500 |" in text and "analysis stays" in text and "tail" in text
    update_block(md, "dp-cost", "new block")
    assert text.count("<!-- bench:") + 1 == md.read_text().count("<!-- bench:")


def test_an_interrupted_cell_starts_from_scratch(tmp_path: Path) -> None:
    cell = Cell("news/eps8/local/seed0", {**TINY, "personalization.mode": "local"}, 2)
    stale = tmp_path / "work" / cell.key / "clients" / "client-0000"
    stale.mkdir(parents=True)
    (stale / "leftover").write_text("from an interrupted attempt")
    run_grid(tmp_path, [cell], workers=1)
    assert not (stale / "leftover").exists()


def test_the_last_group_is_split_so_no_worker_idles() -> None:
    news = [Cell(f"news/eps1/{m}/seed0", {}, group="news/eps1/seed0") for m in ("a", "b", "c", "d", "e")]
    tweets = [Cell(f"tweets/eps1/{m}/seed0", {}, group="tweets/eps1/seed0") for m in ("a", "b")]
    keys = [[c.key.split("/")[0] + c.key.split("/")[2] for c in t] for t in split_for_workers([news], 2)]
    assert keys == [["newsa", "newsb", "newsc"], ["newsd", "newse"]]  # halves, priority order kept
    assert len(split_for_workers([news], 8)) == 5  # never an empty task
    assert split_for_workers([news, tweets], 2) == [news, tweets]  # enough groups: each stays whole
    assert split_for_workers([], 2) == []
