"""The audit recomputes ε with dp-accounting and flags tampering, missing history and overspending."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from common.privacy import compose, epsilon
from server.audit import AuditError, audit_ledger, write_audit

SIGMA, Q, STEPS, DELTA = 0.9, 0.2, 5, 1 / 250


def _ledger(path: Path, rounds: int = 3, clients: int = 2, budget: float = 8.0) -> Path:
    entries, history = [], []
    for r in range(1, rounds + 1):
        history = compose(history, SIGMA, Q, STEPS)
        eps = epsilon(history, DELTA, "prv")
        for c in range(clients):
            entries.append({"round": r, "node_id": 100 + c, "status": "accepted", "client": c, "epsilon": eps,
                            "delta": DELTA, "sigma": SIGMA, "sample-rate": Q, "steps": STEPS,
                            "total-steps": r * STEPS})  # fmt: skip
    meta = {"budget": budget, "accountant": "prv", "delta_rule": "1/n_train per client"}
    path.write_text(json.dumps({"meta": meta, "entries": entries}))
    return path


def test_honest_ledger_passes_and_independent_accountants_agree(tmp_path: Path) -> None:
    report = audit_ledger(_ledger(tmp_path / "ledger.json"))
    assert report["ok"] and len(report["clients"]) == 2
    c = report["clients"][0]
    assert c["epsilon_pld"] == pytest.approx(c["epsilon_reported"], rel=0.01)
    assert c["epsilon_rdp"] > c["epsilon_pld"]  # RDP is the looser bound
    assert [r for r, _ in c["epsilon_by_round"]] == [1, 2, 3]
    paths = write_audit(report, tmp_path / "audit")
    assert "PASS" in paths["md"].read_text() and paths["png"].stat().st_size > 0


def test_tampered_epsilon_is_flagged(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "ledger.json")
    data = json.loads(path.read_text())
    data["entries"][-1]["epsilon"] *= 0.8  # the last entry of client 1 claims less than it spent
    path.write_text(json.dumps(data))
    report = audit_ledger(path)
    assert not report["ok"]
    bad = {c["client"]: c for c in report["clients"]}
    assert bad[0]["status"] == "ok" and bad[1]["status"] == "inconsistent"
    assert "differs from dp-accounting PLD" in bad[1]["problems"][0]


def test_over_budget_and_missing_history_are_flagged(tmp_path: Path) -> None:
    report = audit_ledger(_ledger(tmp_path / "ledger.json"), budget=1.0)
    assert not report["ok"] and all(c["status"] == "over budget" for c in report["clients"])
    path = _ledger(tmp_path / "l2.json")
    data = json.loads(path.read_text())
    data["entries"] = [e for e in data["entries"] if e["round"] > 1]  # an earlier run's entries missing
    path.write_text(json.dumps(data))
    problems = audit_ledger(path)["clients"][0]["problems"]
    assert any("history incomplete" in p for p in problems)


def test_cli_exit_codes_and_clear_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", str(_ledger(tmp_path / "ledger.json"))])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "audit" / "audit.html").is_file()
    over = runner.invoke(app, ["audit", str(tmp_path), "--budget", "1"])
    assert over.exit_code == 1
    missing = runner.invoke(app, ["audit", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no ledger" in missing.output
    # `fedpers audit PATH` is the short form of `fedpers audit ledger PATH`
    assert runner.invoke(app, ["audit", "ledger", str(tmp_path), "--budget", "1"]).exit_code == 1
    sub = runner.invoke(
        app, ["audit", "ledger", str(tmp_path / "ledger.json"), "--out", str(tmp_path / "a2")]
    )
    assert sub.exit_code == 0 and (tmp_path / "a2" / "audit.html").is_file()
    group = runner.invoke(app, ["audit", "--help"])
    assert group.exit_code == 0 and "ledger" in group.output and "canary" in group.output
    with pytest.raises(AuditError, match="no privacy entries"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "ledger.json").write_text('{"meta": {"budget": 8}, "entries": []}')
        audit_ledger(tmp_path / "empty")


def test_user_level_entries_are_recomputed_and_checked(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "ledger.json")
    data = json.loads(path.read_text())
    history: list = []
    for r in (1, 2, 3):
        history = compose(history, 1.1, 0.25, 1)
        data["entries"].append({"round": r, "scope": "user-level", "status": "released",
                                "user-noise-multiplier": 1.1, "user-sample-rate": 0.25, "user-delta": 0.01,
                                "user-epsilon": epsilon(history, 0.01, "prv")})  # fmt: skip
    data["meta"]["user_budget"] = 50.0
    path.write_text(json.dumps(data))
    report = audit_ledger(path)
    assert report["ok"] and report["user_level"]["status"] == "ok" and report["user_level"]["steps"] == 3
    (note,) = [n for n in report["user_level"]["notes"] if "one user's data" in n]  # replace-one, beside it
    assert float(note.split("ε ")[1].split()[0]) > report["user_level"]["epsilon_reported"]
    data["entries"][-1]["user-epsilon"] /= 2
    path.write_text(json.dumps(data))
    report = audit_ledger(path)
    assert not report["ok"] and report["user_level"]["status"] == "inconsistent"
    assert "all users (user-level)" in write_audit(report, tmp_path / "a")["md"].read_text()


def test_a_lost_reply_within_one_noise_plan_is_completed_and_a_rollback_is_flagged(tmp_path: Path) -> None:
    """Round 2's reply of client 0 never arrived (a failed SecAgg+ round) though the client trained:
    round 3 reports 15 steps in all. Same σ and q on both sides: the audit counts the lost steps."""
    path = _ledger(tmp_path / "ledger.json")
    data = json.loads(path.read_text())
    data["entries"] = [e for e in data["entries"] if not (e["client"] == 0 and e["round"] == 2)]
    path.write_text(json.dumps(data))
    c0 = audit_ledger(path)["clients"][0]
    assert c0["status"] == "ok" and c0["steps"] == 3 * STEPS and "lost reply" in c0["notes"][0]
    other = dict(data)  # the same gap across two noise plans cannot be attributed: incomplete
    other["entries"] = [
        dict(e, sigma=1.3) if e["client"] == 0 and e["round"] == 3 else e for e in data["entries"]
    ]
    path.write_text(json.dumps(other))
    assert "history incomplete" in " ".join(audit_ledger(path)["clients"][0]["problems"])
    rolled = _ledger(tmp_path / "rolled.json")
    data = json.loads(rolled.read_text())
    data["entries"].append({**data["entries"][-1], "round": 4, "status": "rejected", "total-steps": STEPS,
                            "reason": "state rolled back: the client reports 5 DP steps in all"})  # fmt: skip
    rolled.write_text(json.dumps(data))
    c1 = audit_ledger(rolled)["clients"][1]
    assert c1["status"] != "ok" and "state rolled back (round 4)" in " ".join(c1["problems"])


def test_a_ledger_with_only_user_level_releases_is_audited(tmp_path: Path) -> None:
    """A cross-device run (dp.enabled = false, user-level DP on the server) has no per-client entries."""
    history: list = []
    entries = []
    for r in (1, 2):
        history = compose(history, 0.9, 0.05, 1)
        entries.append({"round": r, "scope": "user-level", "status": "released", "user-noise-multiplier": 0.9,
                        "user-sample-rate": 0.05, "user-delta": 1e-6,
                        "user-epsilon": epsilon(history, 1e-6, "prv")})  # fmt: skip
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"meta": {"budget": 8, "user_budget": 8}, "entries": entries}))
    report = audit_ledger(path)
    assert report["ok"] and report["clients"] == [] and report["user_level"]["steps"] == 2
    res = CliRunner().invoke(app, ["audit", str(path)])
    assert res.exit_code == 0 and "the user-level releases" in res.output


def test_replace_one_is_a_change_of_up_to_twice_the_clipping_norm() -> None:
    """A user's clipped contribution can be swapped for its opposite: without sampling, replace-one at z is
    add/remove at z / 2 (dp-accounting's convention checked, so the within-user ε is not understated)."""
    from server.audit.ledger import independent_epsilons, replace_one_epsilon

    assert replace_one_epsilon([(2.0, 1.0, 3)], 1e-5) == pytest.approx(
        independent_epsilons([(1.0, 1.0, 3)], 1e-5)[1], rel=0.02
    )
    split = replace_one_epsilon([(0.9, 0.05, 40), (0.9, 0.05, 60)], 1e-6)
    assert split == pytest.approx(replace_one_epsilon([(0.9, 0.05, 100)], 1e-6))
    assert split > independent_epsilons([(0.9, 0.05, 100)], 1e-6)[1]
