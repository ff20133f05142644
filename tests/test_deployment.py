"""docs/deployment.md, run as written, on loopback: a real SuperLink, gateway and three agents.

Every command comes from the fenced ``bash`` blocks of docs/deployment.md's steps 1-5, run through
bash as written; only these are substituted: the host names and ports (everything dials 127.0.0.1 on
free ports), the device's ``node.pub`` and the run folder (paths), and ``~`` (each party runs with its own
``HOME``: the server's folder, or the device's). The one addition: the operator's run config gets keys that
make it a test-sized federation (the tiny BERT instead of MiniLM, small splits, a round timeout).

Three agents start with their own CSV and no partition flags. Agent 0 runs with a shortened give-up window
(``--activation-timeout 90``); once its SuperNode has been up longer than that window, the SuperNode (not
the agent) is SIGKILLed: the agent must start it again and the device take part in a later round. Beside
them, a holder of only ``ca.crt`` tries the Control API through the devices' port, an unregistered key
and an agent dialing without TLS are turned away.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from client.state import StateStore
from common.assets import asset_path, cache_root, ensure
from common.launch import free_port

pytestmark = pytest.mark.slow  # real SuperLink, SuperNodes and agents over TLS: minutes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WINDOW_S = 90  # agent 0's --activation-timeout: its SuperNode is killed after longer uptime than this
DEADLINE_S = 900
TEST_SIZED = (
    'model.name="tiny" model.frozen-layers=1 task.train-size=60 task.test-size=30 train.batch-size=20 '
    "fed.round-timeout=120.0 client.report-before-after=false"
)


def doc_commands() -> list[str]:
    """The commands of docs/deployment.md's steps, in order (continuation lines joined)."""
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    section = text[: text.index("## Secure aggregation")]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(" ".join(line.split()))
    return commands


def _find(commands: list[str], start: str) -> str:
    found = [c for c in commands if c.startswith(start) or f" {start}" in c]
    assert len(found) == 1, f"docs/deployment.md should hold one `{start}` command: {found}"
    return found[0]


class Party:
    """One machine of the deployment: its own HOME and working folder, commands run through bash."""

    def __init__(self, home: Path, logs: Path) -> None:
        self.home = home
        self.logs = logs
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HOME": str(home),
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "FEDPERS_CACHE": str(cache_root()),  # the assets, wherever HOME is
        }
        self.env.pop("FEDPERS_STATE_KEY", None)

    def run(self, command: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", command], cwd=cwd or self.home, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def start(self, name: str, command: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        return subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=self.home, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait(what: str, check, timeout: float, logs: Path) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(1)
    tails = "\n".join(
        f"--- {p.name} ---\n{p.read_text(errors='replace')[-2500:]}" for p in logs.glob("*.log")
    )
    raise TimeoutError(f"timed out waiting for {what}\n{tails}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _supernode(agent: subprocess.Popen) -> psutil.Process | None:
    try:
        kids = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    return next((k for k in kids if "flower-supernode" in " ".join(k.cmdline())), None)


def _device_csvs(count: int) -> list[list[tuple[str, str]]]:
    """Real tweets, a different label mix per device (90 rows each)."""
    ensure("tweets")
    path = asset_path("tweets")
    with path.open(encoding="latin-1", newline="") as fh:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(fh)]
    by_label = {lab: [t for t, lbl in rows if lbl == lab] for lab in ("negative", "neutral", "positive")}
    mixes = [(60, 20, 10), (10, 60, 20), (20, 10, 60)]
    out = []
    for i in range(count):
        own: list[tuple[str, str]] = []
        for (label, texts), k in zip(by_label.items(), mixes[i], strict=True):
            own += [(t, label) for t in texts[i * 100 : i * 100 + k]]
        out.append(own)
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Follow docs/deployment.md once; the tests read what it left behind."""
    root = tmp_path_factory.mktemp("deploy")
    logs = root / "logs"
    logs.mkdir()
    commands = doc_commands()
    fleet, control = free_port(), free_port()
    server = Party(root / "server", logs)
    devices = [Party(root / f"device{i}", logs) for i in range(4)]  # device 3 is never registered
    run_dir = root / "run-1"

    def hosts(command: str) -> str:
        for old, new in (
            ("0.0.0.0:9092", f"127.0.0.1:{fleet}"),
            ("superlink.example.org:9092", f"127.0.0.1:{fleet}"),
            ("127.0.0.1:9093", f"127.0.0.1:{control}"),
        ):
            command = command.replace(old, new)
        return command

    procs: list[subprocess.Popen] = []
    out: dict = {"root": root, "run_dir": run_dir, "server": server, "devices": devices, "logs": logs}
    out["fleet"], out["control"] = fleet, control
    try:
        # 1. server: certificates (for the public name; 127.0.0.1 is added by fedpers) and the SuperLink
        certs = server.run(_find(commands, "fedpers certs"))
        assert certs.returncode == 0, certs.stderr
        procs.append(server.start("server", hosts(_find(commands, "fedpers server"))))
        _wait("the gateway and the SuperLink", lambda: _listening(fleet) and _listening(control), 60, logs)
        # 2. devices: a node key each, registered by the operator (all but device 3)
        register = _find(commands, "flwr supernode register")
        for i, device in enumerate(devices):
            made = device.run(_find(commands, "fedpers node-key"))
            assert made.returncode == 0, made.stderr
            shutil.copy(server.home / "certs" / "ca.crt", device.home / "ca.crt")
            if i < 3:
                pub = shlex.quote(str(device.home / "keys" / "node.pub"))
                done = server.run(register.replace(" node.pub ", f" {pub} "))
                assert done.returncode == 0, done.stdout + done.stderr
        # 3. agents, each with its own CSV and no partition flags
        agent = hosts(_find(commands, "fedpers agent"))
        for device, rows in zip(devices, [*_device_csvs(3), []], strict=True):
            with (device.home / "my-texts.csv").open("w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([("text", "label"), *rows])
        (devices[3].home / "my-texts.csv").write_text("text,label\nhello,positive\n", encoding="utf-8")
        agents = [devices[0].start("agent0", f"{agent} --activation-timeout {WINDOW_S}")]
        agents += [devices[i].start(f"agent{i}", agent) for i in (1, 2)]
        agents.append(devices[3].start("unregistered", f"{agent} --activation-timeout 5"))
        plain = agent.replace("--root-certificates ca.crt", "--insecure") + " --max-retries 2"
        agents.append(devices[0].start("no-tls", plain.replace("~/.fedpers/device", "~/.fedpers/plain")))
        procs += agents
        started = time.monotonic()
        # 4. operator: the run, as the docs have it (plus the test-sized keys)
        run = _find(commands, "flwr run").replace("/srv/fedpers/run-1", str(run_dir))
        run = re.sub(r"secagg\.enabled=true'", f"secagg.enabled=true {TEST_SIZED}'", run)
        submitted = server.run(run, cwd=ROOT)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        _wait("round 1", lambda: _rounds_done(run_dir) >= 1, DEADLINE_S, logs)
        out["rounds_before_kill"] = _rounds_done(run_dir)
        node0 = _supernode(agents[0])
        assert node0 is not None, "agent 0 runs no SuperNode"
        uptime = time.time() - node0.create_time()
        if uptime < WINDOW_S + 5:
            time.sleep(WINDOW_S + 5 - uptime)
        out["killed_uptime"] = time.time() - node0.create_time()
        for proc in [*node0.children(recursive=True), node0]:  # SuperNode and its ClientApp: a crash
            proc.send_signal(signal.SIGKILL)
        out["killed_pid"] = node0.pid
        _wait("the run's summary", lambda: (run_dir / "summary.json").is_file(), DEADLINE_S, logs)
        out["seconds"] = time.monotonic() - started
        out["agent0_alive"] = agents[0].poll() is None
        restarted = _supernode(agents[0])
        out["restarted_pid"] = restarted.pid if restarted else None
        for name, proc in (("unregistered", agents[3]), ("no-tls", agents[4])):
            try:
                out[f"{name}-code"] = proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                out[f"{name}-code"] = None
            out[f"{name}-log"] = (logs / f"{name}.log").read_text(errors="replace")
        out["commands"] = commands
        out["hosts"] = hosts
        yield out
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _ledger_clients(run_dir: Path) -> dict[int, list[dict]]:
    entries = json.loads((run_dir / "ledger.json").read_text())["entries"]
    by: dict[int, list[dict]] = {}
    for e in entries:
        if "client" in e:
            by.setdefault(int(e["client"]), []).append(e)
    return by


def test_the_run_completes_with_three_distinct_devices_everywhere(deployment: dict) -> None:
    run_dir: Path = deployment["run_dir"]
    assert _rounds_done(run_dir) == 3
    by_client = _ledger_clients(run_dir)
    assert len(by_client) == 3 and all(c > 100 for c in by_client), by_client.keys()  # node ids, not 0
    with (run_dir / "clients.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["client"]) for r in rows) == sorted(by_client)
    assert "- clients: 3, rounds: 3" in (run_dir / "report.md").read_text()


def test_the_audit_passes_for_three_devices(deployment: dict) -> None:
    audit = _find(deployment["commands"], "fedpers audit").replace(
        "/srv/fedpers/run-1", str(deployment["run_dir"])
    )
    done = deployment["server"].run(audit)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS: 3 clients" in done.stderr


def test_a_supernode_killed_after_a_long_healthy_stretch_is_restarted_and_takes_part_again(
    deployment: dict,
) -> None:
    assert deployment["killed_uptime"] > WINDOW_S
    assert deployment["agent0_alive"], (deployment["logs"] / "agent0.log").read_text()[-3000:]
    assert deployment["restarted_pid"] not in (None, deployment["killed_pid"])
    device0 = StateStore(deployment["devices"][0].home / ".fedpers" / "device").load()
    assert device0 is not None and device0.rounds_trained >= 2
    by_client = _ledger_clients(deployment["run_dir"])
    steps = {c: max(int(e.get("total-steps", 0)) for e in es) for c, es in by_client.items()}
    assert sum(s for *_, s in device0.history) in steps.values()  # its latest report is in the ledger
    last = max(e["round"] for es in by_client.values() for e in es if e["status"] == "accepted")
    assert last == 3


def test_a_holder_of_only_the_ca_certificate_cannot_use_the_control_api(deployment: dict) -> None:
    """The public ca.crt and the devices' port: list nodes, register a key, submit a run — all refused."""
    root: Path = deployment["root"]
    outsider = Party(root / "outsider", deployment["logs"])
    shutil.copy(deployment["server"].home / "certs" / "ca.crt", outsider.home / "ca.crt")
    (outsider.home / "flwr").mkdir(exist_ok=True)
    (outsider.home / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "127.0.0.1:{deployment["fleet"]}"\n'
        f'root-certificates = "{outsider.home / "ca.crt"}"\n'
    )
    outsider.env["FLWR_HOME"] = str(outsider.home / "flwr")
    made = outsider.run("fedpers node-key --out keys --name intruder")
    assert made.returncode == 0, made.stderr
    for command in (
        "flwr supernode list x",
        f"flwr supernode register {outsider.home / 'keys' / 'intruder.pub'} x",
        f"flwr run {ROOT} x --run-config 'fed.num-rounds=1'",
    ):
        tried = outsider.run(command, cwd=ROOT)
        assert tried.returncode != 0, (command, tried.stdout)
    operator = deployment["server"].run(
        "FLWR_HOME=~/.fedpers/server/flwr flwr supernode list fedpers --format json"
    )
    listed = json.loads(operator.stdout[operator.stdout.index("{") :])
    assert len(listed.get("nodes", [])) == 3, operator.stdout  # no fourth node appeared


def test_a_node_with_an_unregistered_key_is_refused(deployment: dict) -> None:
    assert deployment["unregistered-code"] not in (None, 0), deployment["unregistered-log"][-2000:]
    assert "its key is not registered" in deployment["unregistered-log"]


def test_an_agent_dialing_without_tls_exits_with_the_cause(deployment: dict) -> None:
    assert deployment["no-tls-code"] not in (None, 0), deployment["no-tls-log"][-2000:]
    assert "speaks TLS: drop --insecure" in deployment["no-tls-log"]


def test_server_files_are_private_and_devices_keep_their_own_state(deployment: dict) -> None:
    server: Party = deployment["server"]
    db = server.home / ".fedpers" / "server" / "superlink.db"
    assert db.is_file() and oct(db.stat().st_mode & 0o777) == "0o600"
    assert oct(db.parent.stat().st_mode & 0o777) == "0o700"
    for device in deployment["devices"][:3]:
        state = device.home / ".fedpers" / "device"
        assert oct((state / "state.key").stat().st_mode & 0o777) == "0o600"
    entries = json.loads((deployment["run_dir"] / "ledger.json").read_text())["entries"]
    assert not any("/" in str(e.get("reason", "")).replace("<path>", "") for e in entries)


def test_each_device_uses_its_personalized_model_offline_as_documented(deployment: dict) -> None:
    commands = deployment["commands"]
    predict, recommend = _find(commands, "fedpers predict"), _find(commands, "fedpers recommend")
    for device in deployment["devices"][:3]:
        (device.home / "posts.txt").write_text("what a lovely day\nthis is awful\nthe bus is late again\n")
        for command in (predict, recommend):
            done = device.run(command)
            assert done.returncode == 0, done.stdout + done.stderr
        assert "what a lovely day" in device.run(recommend).stdout
