"""Faults a deployment meets: clients dropping out every round, the server process killed mid-run, a
corrupt data file on a device. (Malformed updates: test_server.py; tampered state: test_state.py; a
SuperNode killed and restarted, unknown keys, no TLS: test_deployment.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY, LocalGrid
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.app import make_client_app
from common.config import Config
from server.app import run_federation

BIN = Path(sys.executable).parent
CLIENTS, DROPPED, ROUNDS = 10, 3, 3  # 30 % of the clients vanish in every round


def _dropped(rnd: int) -> set[int]:
    """The nodes that vanish in round ``rnd`` (a different 30 % each round)."""
    rng = np.random.default_rng(100 + rnd)
    return {1000 + int(i) for i in rng.choice(CLIENTS, DROPPED, replace=False)}


def _round(msg: Message) -> int:
    """The server round of an instruction (SecAgg+ puts it in group_id, FedAvg in the config)."""
    if msg.metadata.group_id:
        return int(msg.metadata.group_id)
    return int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]


def _stage(msg: Message) -> str | None:
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(rec[Key.STAGE]) if rec is not None and Key.STAGE in rec else None


@pytest.mark.parametrize("secagg", [False, True], ids=["fedavg", "secagg"])
def test_thirty_percent_of_clients_dropping_every_round_loses_no_round(
    tmp_path: Path, task_identity: None, secagg: bool
) -> None:
    """Plain: the dropped nodes never answer. SecAgg+: they vanish after the key exchange, mid-round,
    so the server must unmask without them (7 shares, threshold 4 tolerates 3 of 10 gone)."""

    def drop(msg: Message) -> bool:
        gone = msg.metadata.dst_node_id in _dropped(_round(msg))
        if secagg and _stage(msg) in (Stage.SETUP, Stage.SHARE_KEYS):
            return False  # they were there when the round began
        return gone

    overrides: dict[str, Any] = {
        **TINY,
        "fed.num-rounds": ROUNDS,
        "fed.min-clients": 7,
        "fed.round-timeout": 30.0,
        "dp.noise-multiplier": 1.0,
        "train.threads": 1,
        "client.report-before-after": False,
        "output.run-dir": str(tmp_path),
    }
    if secagg:
        overrides.update({"secagg.enabled": True, "secagg.num-shares": 7, "secagg.threshold": 4})
    grid = LocalGrid(make_client_app(overrides), CLIENTS, drop=drop)
    run_federation(Config.from_run_config(overrides), grid, 7)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(1, ROUNDS + 1))
    assert all(x["accepted"] == CLIENTS - DROPPED for x in lines), [x["accepted"] for x in lines]
    ckpt = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["round"] == ROUNDS
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS


def _rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["round"] for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow  # a real server process, killed and started again
def test_server_process_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """A real `fedpers simulate` (ServerApp on Flower's engine) is SIGKILLed after its first round and
    started again with the same command: it resumes from the last checkpoint and finishes."""
    rounds = 5
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[simulation]\nnum-clients = 2\nclient-cpus = 1\n\n[run-config]\n"
        + "".join(f'"{k}" = {json.dumps(v)}\n' for k, v in TINY.items() if k != "fed.num-rounds")
        + f'"fed.num-rounds" = {rounds}\n"dp.noise-multiplier" = 1.0\n"dp.epsilon" = 10.0\n'  # ε 9.1 after 5
        + '"train.threads" = 1\n'
    )
    run_dir = tmp_path / "run"
    argv = [str(BIN / "fedpers"), "simulate", "--config", str(config), "--run-dir", str(run_dir)]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + 300
        while not _rounds(run_dir) and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # server, engine and clients: no clean-up of any kind
        proc.wait(timeout=60)
    at_kill = _rounds(run_dir)
    assert at_kill and at_kill[-1] < rounds, (tmp_path / "first.log").read_text()[-3000:]
    ledger_before = json.loads((run_dir / "ledger.json").read_text())["entries"]
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = json.loads((run_dir / "config.json").read_text())["resumed_after_round"]
    assert resumed >= at_kill[-1] >= 1
    done = _rounds(run_dir)
    assert done[: len(at_kill)] == at_kill and done[-1] == rounds
    assert set(range(resumed + 1, rounds + 1)) <= set(done)
    entries = json.loads((run_dir / "ledger.json").read_text())["entries"]
    assert entries[: len(ledger_before)] == ledger_before  # the first run's ledger kept, then appended
    for client in {e["client"] for e in entries if e.get("epsilon") is not None}:
        eps = [e["epsilon"] for e in entries if e.get("client") == client and e.get("epsilon") is not None]
        assert eps == sorted(eps) and len(eps) >= rounds  # every round accounted, composing across the kill


def test_a_corrupt_data_file_is_one_clear_error_line(tmp_path: Path) -> None:
    data = tmp_path / "mine.csv"
    data.write_bytes(b'text,label\n"unclosed quote,positive\n\xff\xfe\x00garbage')
    result = subprocess.run(
        [str(BIN / "fedpers"), "agent", "--superlink", "127.0.0.1:9092", "--state-dir", str(tmp_path / "s")]
        + ["--insecure", "--data", str(data), "--labels", "negative,positive", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(data) in errors[0], result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
