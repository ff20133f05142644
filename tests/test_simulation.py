"""End to end: a tiny label-skewed federation on Flower's simulation engine (Ray), and CLI config errors.

The simulation is the session fixture ``sim_fresh`` (conftest.py): 3 clients, 2 rounds, the tiny model,
tweets with Dirichlet α = 0.3, DP on. Spies on the strategy record the real reply Messages and then call
the real methods. Files are read from a copy of the run folder taken right after the run.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import SIM_CLIENTS, SIM_OVERRIDES, SimRun
from typer.testing import CliRunner

from cli.main import app as cli_app
from client.state import StateStore
from common import protocol as P
from common.config import Config
from common.privacy import epsilon
from common.split import split_names
from common.tasks import get_backbone

ROUNDS = SIM_OVERRIDES["fed.num-rounds"]
BUDGET = SIM_OVERRIDES["dp.epsilon"]
SIGMA = SIM_OVERRIDES["dp.noise-multiplier"]


@pytest.fixture(scope="module")
def roles() -> dict[str, list[str]]:
    cfg = Config.from_run_config(SIM_OVERRIDES)
    names = [n for n, _ in get_backbone(cfg).template.named_parameters()]
    out = split_names(names, "fedper")
    assert out["shared"] and out["personal"]
    return out


def _ledger(run: SimRun) -> list[dict]:
    assert run.snapshot is not None
    return json.loads((run.snapshot / "ledger.json").read_text())["entries"]


def _clients_csv(run: SimRun) -> list[dict[str, str]]:
    assert run.snapshot is not None
    with (run.snapshot / "clients.csv").open() as fh:
        return list(csv.DictReader(fh))


def _metrics(run: SimRun) -> list[dict]:
    assert run.snapshot is not None
    return [json.loads(line) for line in (run.snapshot / "metrics.jsonl").read_text().splitlines() if line]


# --- what left the clients ------------------------------------------------------------------------
def test_train_replies_carry_exactly_the_shared_tensors(
    sim_fresh: SimRun, roles: dict[str, list[str]]
) -> None:
    assert len(sim_fresh.train_replies) == SIM_CLIENTS * ROUNDS
    personal = set(roles["personal"])
    assert personal == {"head.weight", "head.bias"}
    for reply in sim_fresh.train_replies:
        assert reply["error"] is None, reply
        assert reply["arrays"] == {P.ARRAYS: roles["shared"]}, reply["arrays"]
        sent = {name for names in reply["arrays"].values() for name in names}
        assert not sent & personal
        assert not any(name.startswith("head.") for name in sent)


def test_evaluate_replies_carry_no_tensors(sim_fresh: SimRun) -> None:
    assert len(sim_fresh.eval_replies) == SIM_CLIENTS * ROUNDS
    for reply in sim_fresh.eval_replies:
        assert reply["error"] is None, reply
        assert reply["arrays"] == {}
        assert P.EVAL_ACC in reply["metrics"][P.METRICS]


def test_server_sends_only_the_shared_tensors(sim_fresh: SimRun, roles: dict[str, list[str]]) -> None:
    assert len(sim_fresh.train_instructions) == SIM_CLIENTS * ROUNDS
    for instruction in sim_fresh.train_instructions:
        assert instruction == {P.ARRAYS: roles["shared"]}


# --- the run folder -------------------------------------------------------------------------------
def test_run_folder_has_every_output(sim_fresh: SimRun) -> None:
    out = sim_fresh.snapshot
    assert out is not None
    for name in (
        "config.json",
        "metrics.jsonl",
        "clients.csv",
        "ledger.json",
        "report.md",
        "summary.json",
        "accuracy_per_client.png",
        "epsilon_per_client.png",
        "checkpoint/checkpoint.json",
        f"checkpoint/arrays-{ROUNDS:04d}.npz",
    ):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    for i in range(SIM_CLIENTS):
        assert (out / "clients" / f"client-{i:04d}" / "personal.state").is_file()
    assert json.loads((out / "summary.json").read_text()) == sim_fresh.summary
    assert sim_fresh.summary["clients"] == SIM_CLIENTS
    assert sim_fresh.summary["rounds"] == ROUNDS
    config = json.loads((out / "config.json").read_text())
    assert config["resumed_after_round"] == 0
    assert config["run_config"]["personalization.mode"] == "fedper"


def test_metrics_has_one_line_per_round_and_clients_csv_one_row_per_client(sim_fresh: SimRun) -> None:
    lines = _metrics(sim_fresh)
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    for line in lines:
        assert (line["accepted"], line["rejected"], line["refused"]) == (SIM_CLIENTS, 0, 0)
        assert "eval-acc-mean" in line
    rows = _clients_csv(sim_fresh)
    assert sorted(int(r["client"]) for r in rows) == list(range(SIM_CLIENTS))
    assert all(int(r["rounds"]) == ROUNDS for r in rows)


# --- privacy --------------------------------------------------------------------------------------
def test_ledger_epsilon_equals_each_clients_own_accountant(
    sim_fresh: SimRun, roles: dict[str, list[str]]
) -> None:
    assert sim_fresh.snapshot is not None
    entries = _ledger(sim_fresh)
    assert all(e["status"] == "accepted" for e in entries)
    assert len(entries) == SIM_CLIENTS * ROUNDS
    rows = {int(r["client"]): r for r in _clients_csv(sim_fresh)}
    for i in range(SIM_CLIENTS):
        mine = [e for e in entries if e["client"] == i]
        assert [e["round"] for e in mine] == list(range(1, ROUNDS + 1))
        last = mine[-1]
        state = StateStore(sim_fresh.snapshot / "clients" / f"client-{i:04d}").load()
        assert state is not None
        n_train = int(rows[i]["num-examples"])
        assert last[P.DELTA] == pytest.approx(
            min(1e-5, 0.1 / n_train), rel=1e-12
        )  # dp.delta = 0: the default
        own = epsilon(state.history, last[P.DELTA], "prv")
        assert own == pytest.approx(last[P.EPSILON], rel=1e-6)
        assert float(rows[i][P.EPSILON]) == pytest.approx(own, rel=1e-6)
        # the accountant history is exactly the DP-SGD the client reported: σ fixed, q = 1/steps-per-epoch
        steps = sum(e[2] for e in state.history)
        assert steps == last[P.TOTAL_STEPS] == sum(e[P.STEPS] for e in mine)
        assert {(s, q) for s, q, _ in state.history} == {(SIGMA, last[P.SAMPLE_RATE])}
        assert state.rounds_trained == ROUNDS
        assert sorted(state.tensors) == roles["personal"]  # the head stayed on the device
        # ε grows round by round
        assert mine[0][P.EPSILON] < mine[-1][P.EPSILON]


def test_ledger_holds_what_each_client_sent(sim_fresh: SimRun) -> None:
    entries = _ledger(sim_fresh)
    by_node: dict[int, list[dict]] = {}
    for e in entries:
        by_node.setdefault(e["node_id"], []).append(e)
    sent_by_node: dict[int, list[dict]] = {}
    for reply in sim_fresh.train_replies:
        sent_by_node.setdefault(reply["node"], []).append(reply["metrics"][P.METRICS])
    assert set(by_node) == set(sent_by_node)
    for node, sent in sent_by_node.items():
        assert len(sent) == len(by_node[node]) == ROUNDS
        for metrics, entry in zip(sent, by_node[node], strict=True):
            assert entry["client"] == metrics[P.PARTITION_ID]
            for key in P.PRIVACY_KEYS:
                assert entry[key] == metrics[key], key


def test_epsilon_within_budget(sim_fresh: SimRun) -> None:
    eps = [e[P.EPSILON] for e in _ledger(sim_fresh)]
    assert eps and all(0 < e <= BUDGET for e in eps)
    assert sim_fresh.summary["epsilon-max"] <= BUDGET
    # and it is the fixed-σ accountant, not a number that merely happens to be small
    q = _ledger(sim_fresh)[0][P.SAMPLE_RATE]
    delta = _ledger(sim_fresh)[0][P.DELTA]
    expected = epsilon([(SIGMA, q, ROUNDS * round(1 / q))], delta, "prv")
    assert sim_fresh.summary["epsilon-max"] == pytest.approx(expected, rel=1e-6)


# --- utility --------------------------------------------------------------------------------------
def test_personalized_accuracy_clearly_beats_chance(sim_fresh: SimRun) -> None:
    final = _metrics(sim_fresh)[-1]
    chance = 1 / 3
    assert final["eval-acc-mean"] > chance + 0.2, final
    accs = [float(r[P.EVAL_ACC]) for r in _clients_csv(sim_fresh)]
    assert len(accs) == SIM_CLIENTS
    assert math.isclose(sum(accs) / len(accs), final["eval-acc-mean"], rel_tol=1e-9)
    assert sim_fresh.summary["acc-mean"] > chance + 0.2


# --- CLI configuration errors (no engine starts) --------------------------------------------------
def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_cli_rejects_unknown_key_in_config_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[simulation]\nnum-clients = 2\n\n[run-config]\n"dp.epsilonn" = 3.0\n')
    out = tmp_path / "never"
    code, text = _invoke("simulate", "--config", str(config), "--run-dir", str(out))
    assert code != 0
    assert "dp.epsilonn" in text
    assert "dp.epsilon" in text.replace("dp.epsilonn", "")  # the suggestion
    assert not out.exists()


def test_cli_rejects_unknown_simulation_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[simulation]\nnum-clientz = 2\n")
    code, text = _invoke("simulate", "--config", str(config), "--run-dir", str(tmp_path / "never"))
    assert code != 0
    assert "num-clientz" in text
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("dp.epsilonn=3", "dp.epsilonn"),
        ("dp.epsilon=-1", "dp.epsilon"),
        ("personalization.mode=fedprox", "personalization.mode"),
    ],
)
def test_cli_rejects_bad_set_option(tmp_path: Path, option: str, named: str) -> None:
    code, text = _invoke("simulate", "--set", option, "--run-dir", str(tmp_path / "never"))
    assert code != 0
    assert named in text
    assert not (tmp_path / "never").exists()
