"""``fedpers simulate`` on an existing Ray cluster: ``--ray-address`` / ``--client-gpus`` (issue #31 item 6).

The slow test starts a one-node Ray cluster on 127.0.0.1 in a driver process of its own, runs a 1-round
tiny federation that joins it, checks that the cluster is still up afterwards, then ends the driver (which
stops every process of that cluster) and checks that none of them is left. It never runs ``ray stop``,
which would end every Ray process of the user, other people's simulations included.

``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray on the loopback: with it Ray's node address is
127.0.0.1 and ``127.0.0.1:port`` is dialled as written, where Ray otherwise replaces a loopback address
by this machine's network address.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psutil
import pytest
from conftest import SIM_OVERRIDES
from typer.testing import CliRunner

from cli.main import app
from common import protocol as P
from simulations.run import SimSettings, backend_config, load_settings

BIN = Path(sys.executable).parent
CLIENTS = 2

# The cluster's driver: starts a new local Ray (address="local": never one found in the environment),
# prints its GCS address, answers each stdin line with "alive <jobs so far>" after running a task there,
# and at EOF shuts Ray down, which stops every process it started.
HEAD = """
import sys
import ray
from ray._private.state import state

ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
               _temp_dir=sys.argv[1], logging_level="ERROR")
print("gcs", ctx.address_info["gcs_address"], flush=True)

@ray.remote
def one():
    return 1

for _ in sys.stdin:
    print("alive", ray.get(one.remote(), timeout=120), len(state.job_table()), flush=True)
ray.shutdown()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # RAY_ADDRESS would steer "auto"
    env.update(
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    return env


def _line(stream: IO[str], deadline: float) -> str:
    """The next line of ``stream`` ('' at EOF or when ``deadline`` passes)."""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            return stream.readline()
    return ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _ray_head(cwd: Path) -> Iterator[tuple[str, subprocess.Popen[str], set[int]]]:
    """A Ray head on 127.0.0.1 owned by this test: (GCS address, its driver, the pids it started).

    It runs in ``cwd`` (its log: ``cwd/head.log``), so its workers do too, as on a real cluster.

    On exit the driver's stdin is closed (it shuts its cluster down), anything of its process group still
    there is killed by that group's id, and the test fails if a process of the cluster outlived it.
    """
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths live under it
    cwd.mkdir()
    log = cwd / "head.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", HEAD, temp],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=_env(),
        cwd=cwd,
        start_new_session=True,  # its own process group: the fallback below kills that group only
    )
    started: set[int] = set()
    try:
        assert proc.stdout is not None
        first = _line(proc.stdout, time.monotonic() + 120)
        assert first.startswith("gcs "), f"no Ray head came up: {first!r}\n{log.read_text()[-3000:]}"
        started = _descendants(proc.pid)
        assert started, "the head driver started no Ray process"
        yield first.split()[1], proc, started
    finally:
        started |= _descendants(proc.pid) | _group(proc.pid)  # the actors' workers came later
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        left = _alive(started | _group(proc.pid))
        if left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"Ray processes outlived their driver: {left}"


def _descendants(pid: int) -> set[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return set()


def _group(pgid: int) -> set[int]:
    """The processes of process group ``pgid`` (the head driver's session: every process it started)."""
    out = set()
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(p.pid) == pgid:
                out.add(p.pid)
    return out


def _alive(pids: set[int]) -> list[str]:
    """The processes among ``pids`` still running (zombies are gone), as 'pid name'."""
    out = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {p.name()}")
    return out


def _ask(proc: subprocess.Popen[str]) -> list[str]:
    """The head driver's answer to one ping: ['alive', '1', '<jobs>'], or [] when it does not answer."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("ping\n")
    proc.stdin.flush()
    return _line(proc.stdout, time.monotonic() + 120).split()


@pytest.mark.slow  # a Ray head and a federation that joins it
def test_simulate_joins_a_running_ray_cluster_and_leaves_it_running(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    run_config = {**SIM_OVERRIDES, "fed.num-rounds": 1, "train.threads": 1}
    config.write_text(
        f"[simulation]\nnum-clients = {CLIENTS}\nclient-cpus = 1\n\n[run-config]\n"
        + "".join(f'"{k}" = {json.dumps(v)}\n' for k, v in run_config.items())
    )
    run_dir = tmp_path / "run"
    with _ray_head(tmp_path / "head") as (address, head, started):
        assert address.startswith("127.0.0.1:"), address
        assert _ask(head)[:2] == ["alive", "1"]
        argv = [str(BIN / "fedpers"), "simulate", "-c", str(config), "--run-dir", "run"]  # relative
        argv += ["--ray-address", address, "--client-gpus", "0"]
        res = subprocess.run(argv, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=480)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert f"on the Ray cluster at {address}" in res.stderr
        answer = _ask(head)  # the run ended; its cluster did not
        assert answer[:2] == ["alive", "1"], answer
        assert int(answer[2]) >= 2, answer  # the head's own driver and the simulation's: it joined
        assert _alive(started), "the cluster's processes are gone"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["clients"], summary["rounds"]) == (CLIENTS, 1)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["round"] for x in lines] == [1]
    assert (lines[0]["accepted"], lines[0]["rejected"], lines[0]["refused"]) == (CLIENTS, 0, 0)
    with (run_dir / "clients.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == CLIENTS
    for row in rows:  # every client was evaluated after the round
        assert 0.0 <= float(row[P.EVAL_ACC]) <= 1.0, row
    for i in range(CLIENTS):  # the workers (cwd: the head's folder) wrote where the command meant
        assert (run_dir / "clients" / f"client-{i:04d}" / "personal.state").is_file()
    assert not (tmp_path / "head" / "run").exists()


# --- refused before anything starts ------------------------------------------------------------------
def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--client-gpus", "-1"], "--client-gpus must be a number ≥ 0"),
        (["--client-gpus", "half"], "--client-gpus must be a number ≥ 0"),
        (["--client-gpus", "1.5"], "must be a whole number"),
        (["--ray-address", ""], "--ray-address must be the head's host:port"),
        (["--ray-address", "10.0.0.5"], "--ray-address must be the head's host:port"),
        (["--ray-address", "10.0.0.5:70000"], "--ray-address must be the head's host:port"),
        (["--ray-address", "ray://10.0.0.5:10001"], "--ray-address must be the head's host:port"),
        (["--ray-address", "127.0.0.1:6379", "--sequential"], "--sequential runs without Ray"),
    ],
)
def test_bad_cluster_options_are_one_error_line(tmp_path: Path, args: list[str], said: str) -> None:
    code, text = _invoke("simulate", "--run-dir", str(tmp_path / "never"), *args)
    assert code == 2, text
    assert text.startswith("error:") and said in text, text
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ("client-gpus = -0.5", "[simulation] client-gpus must be a number ≥ 0"),
        ('client-gpus = "1"', "[simulation] client-gpus must be a number ≥ 0"),
        ('ray-address = ""', "[simulation] ray-address must be the head's host:port"),
        ("ray-address = 6379", "[simulation] ray-address must be the head's host:port"),
    ],
)
def test_bad_cluster_keys_are_one_error_line(tmp_path: Path, table: str, said: str) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(f"[simulation]\n{table}\n")
    code, text = _invoke("simulate", "-c", str(config), "--run-dir", str(tmp_path / "never"))
    assert code == 2, text
    assert text.startswith("error:") and said in text, text
    assert not (tmp_path / "never").exists()


def test_nothing_listening_at_the_address_is_refused_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # keep 127.0.0.1 (module docstring)
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    code, text = _invoke("simulate", "--run-dir", str(tmp_path / "never"), "--ray-address", address)
    assert code == 2, text
    assert text.startswith(f"error: no Ray cluster answers at {address}"), text
    assert time.monotonic() - start < 30
    assert not (tmp_path / "never").exists()


def test_settings_carry_the_cluster_keys_and_the_backend_joins_without_sizing(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text('[simulation]\nclient-cpus = 2\nclient-gpus = 0.5\nray-address = " 10.0.0.5:6379 "\n')
    settings = load_settings(config)
    assert (settings.ray_address, settings.client_gpus) == ("10.0.0.5:6379", 0.5)
    assert backend_config(settings) == {
        "client_resources": {"num_cpus": 2.0, "num_gpus": 0.5},
        "init_args": {"address": "10.0.0.5:6379"},  # Ray refuses num_cpus / num_gpus when joining
    }
    local = SimSettings(client_cpus=1.0)  # no address: the local Ray sized as before
    assert backend_config(local) == {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(os.cpu_count() or 1, 1)},
    }
    assert load_settings(None).ray_address == "" and load_settings(None).client_gpus == 0.0
