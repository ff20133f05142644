"""Checkpoints and resumption: the files, the compatibility rule, and a real resumed federation.

The resumed federation is the session fixture ``sim_resumed`` (conftest.py): the 2-round simulation of
``sim_fresh`` continued in the same run folder with fed.num-rounds = 3 (one more Ray simulation).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SIM_CLIENTS, SIM_OVERRIDES, TINY, LocalGrid, SimRun

from client.app import make_client_app
from client.state import StateStore
from common import protocol as P
from common.config import Config
from common.errors import ConfigError
from common.params import get_arrays
from common.privacy import epsilon
from common.split import split_names
from common.tasks import get_backbone
from server import checkpoint
from server.app import run_federation
from server.ledger import Ledger
from server.recorder import Recorder


def _flat(**dotted: object) -> dict[str, object]:
    return Config.from_run_config({**TINY, **dotted}).to_run_config()


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "body.layer.lora_B.default.weight": rng.normal(size=(64, 8)).astype(np.float32),
        "body.layer.lora_A.default.weight": rng.normal(size=(8, 64)).astype(np.float32),
        "a.scalar": np.array(3.5, np.float32),
        "head.bias": rng.normal(size=3).astype(np.float32),
    }


# --- save / load ----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    arrays, flat = _arrays(), _flat()
    checkpoint.save(tmp_path, checkpoint.Checkpoint(4, arrays, flat))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None
    assert loaded.server_round == 4
    assert sorted(loaded.arrays) == sorted(arrays)
    for k, v in arrays.items():
        assert loaded.arrays[k].dtype == v.dtype and loaded.arrays[k].shape == v.shape
        np.testing.assert_array_equal(loaded.arrays[k], v)
    assert loaded.run_config == flat
    checkpoint.check_compatible(loaded, flat)  # types survive the JSON round trip
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["round"] == 4 and meta["names"] == sorted(arrays)
    assert {"python", "flwr", "torch", "numpy"} <= set(meta["versions"])


def test_load_of_an_empty_folder_is_none(tmp_path: Path) -> None:
    assert checkpoint.load(tmp_path) is None
    assert checkpoint.load(tmp_path / "missing") is None


def test_only_the_latest_arrays_are_kept(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, _arrays(1), _flat()))
    checkpoint.save(tmp_path, checkpoint.Checkpoint(2, _arrays(2), _flat()))
    assert sorted(p.name for p in tmp_path.glob("arrays-*.npz")) == ["arrays-0002.npz"]
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.server_round == 2
    np.testing.assert_array_equal(loaded.arrays["head.bias"], _arrays(2)["head.bias"])


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, _arrays(1), _flat()))

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_json_atomic", disk_full)  # fault injection: dies before the JSON
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, checkpoint.Checkpoint(2, _arrays(2), _flat()))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.server_round == 1
    for k, v in _arrays(1).items():
        np.testing.assert_array_equal(loaded.arrays[k], v)


# --- compatibility --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        {"fed.num-rounds": 9},
        {"output.resume": False},
        {"fed.round-timeout": 60.0},
        {"fed.fraction-evaluate": 0.5},
    ],
)
def test_check_compatible_allows_resumable_changes(tmp_path: Path, change: dict[str, object]) -> None:
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, _arrays(), _flat()))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None
    checkpoint.check_compatible(loaded, _flat(**change))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"personalization.mode": "fedsa"}, "personalization.mode"),
        ({"model.name": "minilm"}, "model.name"),
        ({"dp.epsilon": 3.0}, "dp.epsilon"),
        ({"lora.r": 4}, "lora.r"),
    ],
)
def test_check_compatible_refuses_another_configuration(
    tmp_path: Path, change: dict[str, object], key: str
) -> None:
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, _arrays(), _flat()))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        checkpoint.check_compatible(loaded, _flat(**change, **{"fed.num-rounds": 7}))
    assert "fed.num-rounds" not in str(info.value)  # only the real differences are named


# --- resumption at the server level, without Ray --------------------------------------------------
def test_ledger_and_recorder_keep_earlier_rounds(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.json", meta={"budget": 8.0})
    ledger.record(1, 11, "accepted", {P.PARTITION_ID: 0, P.EPSILON: 1.0})
    ledger.save()
    again = Ledger(tmp_path / "ledger.json", meta={"budget": 8.0, "accountant": "prv"})
    assert again.entries == ledger.entries
    assert again.meta == {"budget": 8.0, "accountant": "prv"}
    recorder = Recorder(tmp_path, 3)
    recorder.end_round(1, 0.5)
    recorder.end_round(2, 0.5)
    assert [r["round"] for r in Recorder(tmp_path, 3).rounds] == [1, 2]


def test_resume_refuses_a_checkpoint_of_another_mode(tmp_path: Path, task_identity: None) -> None:
    first = {**TINY, "output.run-dir": str(tmp_path)}
    checkpoint.save(
        tmp_path / "checkpoint",
        checkpoint.Checkpoint(1, _arrays(), Config.from_run_config(first).to_run_config()),
    )
    other = {**first, "personalization.mode": "fedsa"}
    grid = LocalGrid(make_client_app(other), 2)
    with pytest.raises(ConfigError, match="personalization.mode"):
        run_federation(Config.from_run_config(other), grid, 7)
    assert grid.replies == []


def test_resume_of_a_finished_run_sends_nothing(tmp_path: Path, task_identity: None) -> None:
    cfg = Config.from_run_config({**TINY, "output.run-dir": str(tmp_path)})
    template = get_backbone(cfg).template
    shared = split_names([n for n, _ in template.named_parameters()], "fedper")["shared"]
    arrays = {k: v + 1.0 for k, v in get_arrays(template, shared).items()}
    checkpoint.save(tmp_path / "checkpoint", checkpoint.Checkpoint(2, arrays, cfg.to_run_config()))
    grid = LocalGrid(make_client_app(cfg.to_run_config()), 2)
    run_federation(cfg, grid, 7)
    assert grid.replies == []
    assert json.loads((tmp_path / "config.json").read_text())["resumed_after_round"] == 2
    loaded = checkpoint.load(tmp_path / "checkpoint")
    assert loaded is not None and loaded.server_round == 2


def test_resume_false_starts_over(tmp_path: Path, task_identity: None) -> None:
    overrides = {
        **TINY,
        "fed.num-rounds": 1,
        "dp.noise-multiplier": 1.0,
        "train.threads": 1,
        "output.run-dir": str(tmp_path),
    }
    run_federation(Config.from_run_config(overrides), LocalGrid(make_client_app(overrides), 2), 7)
    again = {**overrides, "output.resume": False}
    run_federation(Config.from_run_config(again), LocalGrid(make_client_app(again), 2, run_id=8), 8)
    assert json.loads((tmp_path / "config.json").read_text())["resumed_after_round"] == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1]
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1


# --- resumption of a real simulated federation (Ray) ----------------------------------------------
def _entries(run: SimRun) -> list[dict]:
    assert run.snapshot is not None
    return json.loads((run.snapshot / "ledger.json").read_text())["entries"]


def test_resumed_run_continues_the_round_numbering(sim_resumed: SimRun) -> None:
    out = sim_resumed.snapshot
    assert out is not None
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert all(x["accepted"] == SIM_CLIENTS for x in lines)
    config = json.loads((out / "config.json").read_text())
    assert config["resumed_after_round"] == 2
    assert config["run_config"]["fed.num-rounds"] == 3
    ckpt = checkpoint.load(out / "checkpoint")
    assert ckpt is not None and ckpt.server_round == 3
    assert sim_resumed.summary["rounds"] == 3
    assert len(sim_resumed.train_replies) == SIM_CLIENTS  # only the one remaining round was trained


def test_resumed_run_starts_from_the_checkpointed_tensors(sim_fresh: SimRun, sim_resumed: SimRun) -> None:
    assert sim_fresh.snapshot is not None and sim_resumed.first_arrays is not None
    saved = checkpoint.load(sim_fresh.snapshot / "checkpoint")
    assert saved is not None and saved.server_round == 2
    cfg = Config.from_run_config(SIM_OVERRIDES)
    template = get_backbone(cfg).template
    shared = split_names([n for n, _ in template.named_parameters()], "fedper")["shared"]
    initial = get_arrays(template, shared)
    assert sorted(sim_resumed.first_arrays) == sorted(saved.arrays) == sorted(initial)
    for k, v in saved.arrays.items():
        np.testing.assert_array_equal(sim_resumed.first_arrays[k], v)
    assert any(not np.array_equal(saved.arrays[k], initial[k]) for k in initial)  # training moved them


def test_resumed_clients_keep_composing_their_epsilon(sim_fresh: SimRun, sim_resumed: SimRun) -> None:
    assert sim_resumed.snapshot is not None
    first, second = _entries(sim_fresh), _entries(sim_resumed)
    assert second[: len(first)] == first  # the ledger is appended to, never rewritten
    budget = SIM_OVERRIDES["dp.epsilon"]
    for i in range(SIM_CLIENTS):
        before = [e for e in first if e["client"] == i][-1]
        after = [e for e in second if e["client"] == i]
        assert [e["round"] for e in after] == [1, 2, 3]
        last = after[-1]
        assert last[P.EPSILON] > before[P.EPSILON]
        assert last[P.EPSILON] <= budget
        assert last[P.TOTAL_STEPS] == before[P.TOTAL_STEPS] + last[P.STEPS]
        state = StateStore(sim_resumed.snapshot / "clients" / f"client-{i:04d}").load()
        assert state is not None and state.rounds_trained == 3
        own = epsilon(state.history, last[P.DELTA], "prv")
        assert own == pytest.approx(last[P.EPSILON], rel=1e-6)
        # one accountant over all 3 rounds, not a fresh one per run
        whole = epsilon(
            [(SIM_OVERRIDES["dp.noise-multiplier"], last[P.SAMPLE_RATE], last[P.TOTAL_STEPS])],
            last[P.DELTA],
            "prv",
        )
        assert own == pytest.approx(whole, rel=1e-6)


def test_resumed_clients_csv_counts_every_round(sim_resumed: SimRun) -> None:
    assert sim_resumed.snapshot is not None
    with (sim_resumed.snapshot / "clients.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == SIM_CLIENTS
    assert [int(r["rounds"]) for r in rows] == [3] * SIM_CLIENTS
