"""The agent supervises its SuperNode forever and gives up only on what waiting cannot heal.

The SuperNode is played by a small real process that behaves as flower-supernode does in each case (runs
for a while and crashes, prints Flower's activation refusal, ...); the supervisor under test is the real
``run_agent``, with its timings scaled down.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from pathlib import Path

import pytest

from client.agent import ACTIVATION_FAILED, NOT_REGISTERED, AgentLaunch, probe_link, run_agent
from common.launch import free_port
from server.certs import create_tls

# Each start appends a line to a counter file and does what the script for that start says.
CHILD = """
import sys, time
counter, script = sys.argv[1], sys.argv[2].split(",")
with open(counter, "a") as fh:
    fh.write("x")
n = len(open(counter).read())
step = script[min(n, len(script)) - 1]
if step.startswith("run"):
    time.sleep(float(step[3:]))
    sys.exit(1)
if step == "refused":
    print("Exit Code: 305\\n%s: node not activated" % ACTIVATION, flush=True)
    sys.exit(1)
if step == "unregistered":
    print("[code: 2001] SuperNode authentication is enabled. %s via the CLI." % NOT_REGISTERED, flush=True)
    sys.exit(1)
sys.exit(0)
"""


def _launch(tmp_path: Path, script: str) -> tuple[AgentLaunch, Path]:
    code = CHILD.replace("ACTIVATION", repr(ACTIVATION_FAILED)).replace(
        "NOT_REGISTERED", repr(NOT_REGISTERED)
    )
    child = tmp_path / "supernode.py"
    child.write_text(code)
    counter = tmp_path / "starts"
    argv = [sys.executable, str(child), str(counter), script]
    closed = f"127.0.0.1:{free_port()}"  # nothing listens: a failed connection looks transient
    return AgentLaunch(argv, {}, [], superlink=closed), counter


def _starts(counter: Path) -> int:
    return len(counter.read_text()) if counter.exists() else 0


def test_a_crash_after_a_healthy_stretch_longer_than_the_window_is_restarted(tmp_path: Path) -> None:
    """Healthy for 1.5 s (longer than the 1 s window), then a crash, then refusals while the SuperLink
    holds the old session, then running again (exit 0 ends the test)."""
    launch, counter = _launch(tmp_path, "run1.5,refused,refused,ok")
    code = run_agent(launch, activation_timeout=1.0, retry_every=0.05, healthy_after=0.5)
    assert code == 0 and _starts(counter) == 4


def test_transient_failures_are_retried_without_end_and_back_off(tmp_path: Path) -> None:
    launch, counter = _launch(tmp_path, "run0,run0,run0,run0,run0,ok")  # unreachable: fails at once
    code = run_agent(launch, activation_timeout=0.01, retry_every=0.01, healthy_after=10.0)
    assert code == 0 and _starts(counter) == 6  # no give-up, though it failed far past the window


def test_refusals_that_outlast_the_window_end_the_agent_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    launch, counter = _launch(tmp_path, "refused")
    code = run_agent(launch, activation_timeout=0.3, retry_every=0.05, healthy_after=10.0)
    assert code == 1 and 3 <= _starts(counter) <= 12
    assert "its key is not registered" in capsys.readouterr().err


def test_a_node_without_a_key_at_an_authenticating_superlink_gives_up_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    launch, counter = _launch(tmp_path, "unregistered")
    assert run_agent(launch, activation_timeout=100.0, retry_every=0.05) == 1 and _starts(counter) == 1
    assert "fedpers node-key" in capsys.readouterr().err


def _serve(tls: ssl.SSLContext | None) -> tuple[str, threading.Event]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    done = threading.Event()

    def loop() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                if tls is not None:
                    with tls.wrap_socket(conn, server_side=True):
                        pass
                else:
                    conn.close()
            except (ssl.SSLError, OSError):
                pass
        listener.close()

    threading.Thread(target=loop, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", done


def test_probe_tells_plain_http_against_tls_from_a_transient_failure(tmp_path: Path) -> None:
    files = create_tls(tmp_path, ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.server_cert, files.server_key)
    tls_address, stop_tls = _serve(ctx)
    plain_address, stop_plain = _serve(None)
    try:
        assert "speaks TLS: drop --insecure" in (probe_link(tls_address, insecure=True) or "")
        assert probe_link(plain_address, insecure=True) is None
        assert probe_link(tls_address, insecure=False) is None
        assert probe_link(f"127.0.0.1:{free_port()}", insecure=True) is None  # down: may heal
    finally:
        stop_tls.set()
        stop_plain.set()
