"""Budgets across runs: client state and the server ledger persist, ε keeps composing, the audit agrees."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY, LocalGrid

from client.app import make_client_app
from common.config import Config
from server.app import run_federation
from server.audit import audit_ledger


def _run(overrides: dict, run_dir: Path, run_id: int) -> None:
    over = {**overrides, "output.run-dir": str(run_dir)}
    run_federation(Config.from_run_config(over), LocalGrid(make_client_app(over), 2, run_id=run_id), run_id)


def test_second_run_composes_with_the_first_and_the_shared_ledger_audits_clean(
    tmp_path: Path, task_identity: None
) -> None:
    overrides = {
        **TINY,
        "fed.num-rounds": 2,
        "dp.epsilon": 3.0,
        "train.threads": 1,
        "client.state-root": str(tmp_path / "devices"),
        "output.ledger": str(tmp_path / "federation-ledger.json"),
    }
    _run(overrides, tmp_path / "run1", 7)
    first = audit_ledger(tmp_path / "federation-ledger.json")
    assert first["ok"]
    eps1 = {c["client"]: c["epsilon_reported"] for c in first["clients"]}
    _run(overrides, tmp_path / "run2", 8)
    both = audit_ledger(tmp_path / "federation-ledger.json")
    assert both["ok"], both["clients"]
    for c in both["clients"]:  # the second run composed with the first: more steps, larger ε, within budget
        assert c["steps"] == c["reported_total_steps"] and c["epsilon_reported"] > eps1[c["client"]]
        assert c["epsilon_reported"] <= 3.0 + 1e-9
    # The second run's ledger alone lacks the first run's history: the audit says so.
    entries = json.loads((tmp_path / "federation-ledger.json").read_text())["entries"]
    half = {"meta": {"budget": 3.0, "accountant": "prv"}, "entries": entries[len(entries) // 2 :]}
    (tmp_path / "half.json").write_text(json.dumps(half))
    partial = audit_ledger(tmp_path / "half.json")
    assert not partial["ok"] and "history incomplete" in partial["clients"][0]["problems"][0]


def test_user_level_dp_in_a_real_federation_is_recorded_and_audited(
    tmp_path: Path, task_identity: None
) -> None:
    overrides = {
        **TINY,
        "fed.num-rounds": 2,
        "train.threads": 1,
        "dp.user-level": True,
        "dp.user-noise-multiplier": 1.0,
        "dp.user-clipping": "adaptive",
        "dp.user-delta": 1e-3,
    }
    _run(overrides, tmp_path / "run", 7)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    user = [e for e in ledger["entries"] if e.get("scope") == "user-level"]
    assert [e["status"] for e in user] == ["released", "released"]
    assert user[0]["user-sample-rate"] == 1.0 and user[1]["user-epsilon"] > user[0]["user-epsilon"]
    assert user[1]["user-clipping-norm"] != user[0]["user-clipping-norm"]  # adaptive clipping moved S
    report = audit_ledger(tmp_path / "run")
    assert report["ok"] and report["user_level"]["steps"] == 2
