"""The one-run empirical audit: the statistics, soundness under DP, and detection without DP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from server.audit.canary import AuditSetup, epsilon_lower_bound, p_value, run_canary_audit

TINY = {"model.name": "tiny", "model.frozen-layers": 1, "task.train-size": 300, "task.test-size": 10}


def test_p_value_and_lower_bound_behave() -> None:
    assert p_value(1000, 200, 100, 0.0, 0.0) > 0.5  # chance level is no evidence
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    perfect = epsilon_lower_bound(1000, 200, 200, 1e-5)
    assert 3.5 < perfect < 5.0  # r = 200 guesses can certify at most ≈ ln(200)-ish
    assert epsilon_lower_bound(1000, 200, 180, 1e-5) < perfect
    assert epsilon_lower_bound(1000, 200, 180, 1e-3) < epsilon_lower_bound(1000, 200, 180, 1e-6)
    with pytest.raises(ValueError, match="0 ≤ v ≤ r ≤ m"):
        p_value(10, 20, 5, 1.0, 0.0)


def test_audit_is_sound_under_dp_and_detects_training_without_dp() -> None:
    setup = AuditSetup(canaries=600, guesses=60, epsilon=2.0, sample_rate=1.0, steps=2, seed=3)
    private = run_canary_audit(setup, TINY)
    assert private["sigma"] > 0 and private["epsilon-lower-bound"] <= 2.0
    leaky = run_canary_audit(AuditSetup(canaries=600, guesses=60, sample_rate=1.0, steps=2, dp=False), TINY)
    assert leaky["correct"] == leaky["guesses"] == 120
    assert leaky["epsilon-lower-bound"] > private["epsilon-lower-bound"] + 1.0


def test_cli_canary_audit_and_clear_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["audit", "--canaries", "300", "--guesses", "30", "--sample-rate", "1", "--steps", "1",
            "--set", "model.name=tiny", "--set", "model.frozen-layers=1", "--out", str(tmp_path)]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "canary-audit.json").read_text())
    assert result["canaries"] == 300 and result["epsilon-lower-bound"] <= 4.0
    bad = runner.invoke(app, ["audit", "--canaries", "10", "--guesses", "30", "--set", "model.name=tiny"])
    assert bad.exit_code == 2 and "cannot exceed the canaries" in bad.output
    none = runner.invoke(app, ["audit"])
    assert none.exit_code == 2 and "--canaries" in none.output
    # `fedpers audit --canaries N` is the short form of `fedpers audit canary --canaries N`
    sub = runner.invoke(
        app, ["audit", "canary", "--canaries", "10", "--guesses", "30", "--set", "model.name=tiny"]
    )
    assert sub.exit_code == 2 and "cannot exceed the canaries" in sub.output
    missing = runner.invoke(app, ["audit", "canary"])
    assert missing.exit_code == 2 and "--canaries" in missing.output
