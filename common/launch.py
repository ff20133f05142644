"""Shared by the agent and the server launcher: address checks, free ports, a supervised child process."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


def check_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) or a ConfigError saying what is wrong."""
    m = _ADDRESS.match(address.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"address {address!r} must be HOST:PORT (e.g. superlink.example.org:9091)")
    return m["host"], int(m["port"])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_tool(name: str) -> str | None:
    """A Flower command installed next to this Python (the venv's bin), else the first on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


@dataclass(frozen=True)
class ChildExit:
    """How a foreground child ended: its exit code, whether we were asked to stop, what it printed."""

    code: int
    stopped: bool  # SIGINT/SIGTERM reached us and was passed on: do not restart it
    seen: frozenset[str]  # which of the watched phrases appeared in its output


def run_foreground(argv: list[str], env: Mapping[str, str], watch: Sequence[str] = ()) -> ChildExit:
    """Run ``argv`` until it exits, its output passed through line by line; SIGINT/SIGTERM are passed on.

    Flower's command-line tools exit with status 1 for every error and print the reason (``Exit Code:
    305 … Failed to activate SuperNode``), so callers tell failures apart by the ``watch`` phrases.
    """
    proc = subprocess.Popen(
        argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, text=True
    )
    seen: set[str] = set()
    stopped = threading.Event()

    def _copy() -> None:
        for line in proc.stdout or ():
            sys.stdout.write(line)
            sys.stdout.flush()
            seen.update(w for w in watch if w in line)

    def _forward(signum: int, _frame: object) -> None:
        stopped.set()
        proc.send_signal(signum)

    reader = threading.Thread(target=_copy, daemon=True)
    reader.start()
    previous = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    reader.join(timeout=5)
    return ChildExit(code, stopped.is_set(), frozenset(seen))
