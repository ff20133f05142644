"""The framework-free sequential runner drives the same client logic and aggregation."""

from __future__ import annotations

from pathlib import Path

from client.state import StateStore
from common.privacy import epsilon
from simulations.sequential import run_sequential

TINY = {
    "model.name": "tiny",
    "model.frozen-layers": 1,
    "task.train-size": 40,
    "task.test-size": 20,
    "train.batch-size": 20,
    "fed.num-rounds": 2,
}


def test_sequential_run_trains_every_client_and_composes_epsilon(tmp_path: Path) -> None:
    lines: list[dict] = []
    out = run_sequential(TINY, 3, tmp_path, on_round=lines.append)
    assert [ln["round"] for ln in lines] == [1, 2]
    assert out["mode"] == "fedper" and 0.0 <= out["acc-p10"] <= out["acc-mean"] <= 1.0
    assert out["epsilon-max"] <= 8.0
    for i in range(3):
        state = StateStore(tmp_path / "clients" / f"client-{i:04d}").load()
        assert state is not None and state.rounds_trained == 2
        delta = float(state.run_plan["delta"])
        assert epsilon(state.history, delta, "prv") <= 8.0 + 1e-9
        assert sorted(state.tensors) == ["head.bias", "head.weight"]


def test_sequential_ledger_matches_reported_epsilon_and_evaluates_at_the_end(tmp_path: Path) -> None:
    import json

    lines: list[dict] = []
    out = run_sequential(
        {**TINY, "fed.num-rounds": 3, "fed.evaluate-every": 5}, 2, tmp_path, on_round=lines.append
    )
    assert ["eval-acc-mean" in ln for ln in lines] == [False, False, True]  # only the final round
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    entries = ledger["entries"]
    assert sorted((e["round"], e["client"]) for e in entries) == [(r, c) for r in (1, 2, 3) for c in (0, 1)]
    assert max(e["epsilon"] for e in entries) == out["epsilon-max"]
    assert sorted(c["client"] for c in out["clients"]) == [0, 1]


def test_fedavg_ft_final_finetune_is_in_the_ledger_and_in_epsilon_max(tmp_path: Path) -> None:
    import json

    out = run_sequential({**TINY, "personalization.mode": "fedavg-ft"}, 2, tmp_path)
    entries = json.loads((tmp_path / "ledger.json").read_text())["entries"]
    finetune = [e for e in entries if e["status"] == "finetune"]
    assert sorted(e["client"] for e in finetune) == [0, 1]
    state = StateStore(tmp_path / "clients" / "client-0000").load()
    assert state is not None
    truth = epsilon(state.history, float(state.run_plan["delta"]), "prv")  # the client's own accountant
    assert out["epsilon-max"] >= truth - 1e-9 and max(e["epsilon"] for e in entries) == out["epsilon-max"]


def test_cli_sequential_compare_writes_what_the_flower_path_writes(tmp_path: Path) -> None:
    """`fedpers simulate --sequential --compare`: compare.json/.md and paired.md, no feature cache left."""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    args = [
        "simulate",
        "--sequential",
        "--compare",
        "fedper,local",
        "--clients",
        "2",
        "--run-dir",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, [*args, *sets])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["mode"] for r in rows[:2]] == ["fedper", "local"]
    assert rows[2]["mode"] == "own-majority (trivial)"
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "paired.md").is_file()
    assert not (tmp_path / "feature-cache").exists()  # shared by the modes, removed at the end
