"""End to end on loopback: a real SuperLink (TLS + node authentication) and three real SuperNodes.

Everything goes through the commands a deployment uses (`fedpers certs`, `fedpers node-key`,
`fedpers server`, `fedpers agent`, `flwr supernode register`, `flwr run`): one 3-round federation in
which SuperNode 0 is killed (SIGKILL, the whole process group) right after round 1 and started again;
the run must complete, and the restarted client's personal head and privacy history must have survived
and kept composing. A SuperNode whose key is not registered and one that dials without TLS are refused.
The whole deployment runs twice: with plain FedAvg and with SecAgg+ (the killed node is a dropout there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.node_key import create_node_key
from client.state import StateStore
from common.launch import free_port
from common.privacy import epsilon
from server.certs import create_tls
from server.link import LinkOptions, plan_link

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_CONFIG = {
    "model.name": "tiny",
    "model.frozen-layers": 1,
    "task.train-size": 60,
    "task.test-size": 30,
    "train.batch-size": 20,
    "task.dirichlet-alpha": 0.3,
    "dp.noise-multiplier": 0.7,
    "dp.epsilon": 6.0,
    "fed.num-rounds": 3,
    "fed.min-clients": 3,
    "fed.round-timeout": 60.0,
    "client.report-before-after": False,
}
DEADLINE_S = 600


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


class Procs:
    """Child processes in their own sessions, so that a kill takes their children (ClientApps) too."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs):
            try:
                self.procs[name].wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.procs[name].pid, signal.SIGKILL)
            self.procs.pop(name)


def _wait_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _wait(what: str, check, timeout: float, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {n} ---\n{procs.log(n)[-3000:]}" for n in sorted(procs.procs))
    raise TimeoutError(f"timed out waiting for {what}\n{tails}")


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module", params=["fedavg", "secagg"])
def deployment(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[dict]:
    """Run the whole deployment once per aggregation (plain, SecAgg+); the tests read what it left."""
    secagg = request.param == "secagg"
    root = tmp_path_factory.mktemp(f"deploy-{request.param}")
    procs = Procs(root)
    port = free_port()
    certs = create_tls(root / "certs", ["127.0.0.1"])
    keys = [create_node_key(root / f"keys{i}") for i in range(4)]  # keys3 is never registered
    link = plan_link(
        LinkOptions(
            address=f"127.0.0.1:{port}",
            certs=root / "certs",
            database=root / "superlink.db",
            flwr_home=root / "operator",
        ),
        flower_superlink=str(BIN / "flower-superlink"),
    )
    env = {**link.env}
    agent_env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    base = [str(BIN / "fedpers"), "agent", "--superlink", f"127.0.0.1:{port}", "--device", "cpu"]
    agents = []
    for i in range(4):
        agents.append(
            [
                *base,
                *("--state-dir", str(root / f"device{i}"), "--root-certificates", str(certs.ca_cert)),
                *(
                    "--node-key",
                    str(keys[i].private),
                    "--partition-id",
                    str(min(i, 2)),
                    "--num-partitions",
                    "3",
                ),
                *(("--activation-timeout", "5") if i == 3 else ()),
            ]
        )
    no_tls = [*base, "--state-dir", str(root / "plain"), "--insecure", "--node-key", str(keys[0].private)]
    no_tls += ["--max-retries", "3", "--activation-timeout", "5"]
    run_dir = root / "run"
    out: dict = {"root": root, "run_dir": run_dir, "procs": procs}
    try:
        procs.start("superlink", link.argv, env)
        _wait_port(port)
        flwr = str(BIN / "flwr")
        for i in range(3):
            subprocess.run(
                [flwr, "supernode", "register", str(keys[i].public), "fedpers"],
                env=env,
                check=True,
                capture_output=True,
                timeout=60,
            )
        for i in range(3):
            procs.start(f"node{i}", agents[i], agent_env)
        procs.start("unregistered", agents[3], agent_env)
        procs.start("no-tls", no_tls, agent_env)
        overrides = " ".join(
            f"{k}={_toml_value(v)}"
            for k, v in {**RUN_CONFIG, "secagg.enabled": secagg, "output.run-dir": str(run_dir)}.items()
        )
        started = time.monotonic()
        subprocess.run(
            [flwr, "run", str(ROOT), "fedpers", "--run-config", overrides],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        _wait("round 1", lambda: _rounds_done(run_dir) >= 1, DEADLINE_S, procs)
        before = StateStore(root / "device0").load()
        out["after_round1"] = before
        procs.kill("node0")  # a crash at the start of round 2: SuperNode and its ClientApp, no clean-up
        time.sleep(3)
        procs.start("node0", agents[0], agent_env)
        _wait("the run's summary", lambda: (run_dir / "summary.json").is_file(), DEADLINE_S, procs)
        out["seconds"] = time.monotonic() - started
        for name in ("unregistered", "no-tls"):
            proc = procs.procs[name]
            try:
                out[f"{name}-code"] = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                out[f"{name}-code"] = None
            out[f"{name}-log"] = procs.log(name)
        yield out
    finally:
        procs.stop_all()


def test_the_run_completes_every_round(deployment: dict) -> None:
    run_dir: Path = deployment["run_dir"]
    assert _rounds_done(run_dir) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dp"] is True


def test_restarted_client_kept_its_head_and_its_privacy_history(deployment: dict) -> None:
    before = deployment["after_round1"]
    after = StateStore(deployment["root"] / "device0").load()
    assert before is not None and after is not None
    assert after.rounds_trained > before.rounds_trained >= 1
    # nothing lost, only added to: every (σ, q) of before is still there with at least its steps
    spent = {(sigma, q): steps for sigma, q, steps in after.history}
    for sigma, q, steps in before.history:
        assert spent.get((sigma, q), 0) >= steps
    assert sum(s for *_, s in after.history) > sum(s for *_, s in before.history)
    delta = float(after.run_plan["delta"])
    assert epsilon(after.history, delta, "prv") > epsilon(before.history, delta, "prv")
    assert set(after.tensors) == set(before.tensors) and after.tensors
    ledger = json.loads((deployment["run_dir"] / "ledger.json").read_text())
    entries = [e for e in ledger["entries"] if e.get("client") == 0 and e.get("epsilon") is not None]
    assert entries and max(e["epsilon"] for e in entries) == pytest.approx(
        epsilon(after.history, delta, "prv"), rel=1e-6
    )


def test_a_node_with_an_unregistered_key_is_refused(deployment: dict) -> None:
    assert deployment["unregistered-code"] not in (None, 0), deployment["unregistered-log"][-2000:]
    assert "Failed to activate SuperNode" in deployment["unregistered-log"]


def test_a_node_without_tls_cannot_connect(deployment: dict) -> None:
    assert deployment["no-tls-code"] not in (None, 0), deployment["no-tls-log"][-2000:]


def test_no_node_saw_another_devices_state(deployment: dict) -> None:
    root: Path = deployment["root"]
    for i in range(3):
        files = {p.name for p in (root / f"device{i}").iterdir()}
        assert "state.key" in files and "flwr" in files
        assert oct((root / f"device{i}" / "state.key").stat().st_mode & 0o777) == "0o600"
    assert shutil.which("flwr") or (BIN / "flwr").exists()


def test_each_device_can_use_its_personalized_model_offline(deployment: dict) -> None:
    from client.predict import predict

    for i in range(3):
        out = predict(deployment["root"] / f"device{i}", ["what a lovely day", "this is awful"])
        assert [p.text for p in out] == ["what a lovely day", "this is awful"]
        assert all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in out)
