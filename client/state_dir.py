"""What a ``--state-dir`` is when it is not a client's state folder (predict, recommend, chat, generate).

A client's state folder holds ``personal.state``. Users often point at a level above it: a run folder, a
mode folder, the ``clients/`` folder. The error then names what the folder is and lists the client
folders inside it (with each one's user, when the simulation wrote ``users.json`` beside them).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import StateError

STATE_FILE = "personal.state"
USER_MAP = "users.json"  # beside a simulation's client folders: {"client-0000": "<user>", ...}
EXAMPLE = "runs/<run>/clients/client-0000"
SHOWN = 6  # client folders listed in an error


def check_state_dir(state_dir: str | Path) -> Path:
    """``state_dir`` as a Path if it holds a client's personal state; else StateError saying what it is."""
    path = Path(state_dir)
    if (path / STATE_FILE).is_file():
        return path
    if not path.exists():
        raise StateError(f"--state-dir {path} does not exist: give a client's state folder, e.g. {EXAMPLE}")
    if not path.is_dir():
        raise StateError(f"--state-dir {path} is a file, not a client's state folder (e.g. {EXAMPLE})")
    kind, clients = _clients_below(path)
    if clients:
        raise StateError(
            f"--state-dir {path} is {kind}, not a client's state folder; give one of its clients: "
            f"{_listing(clients)}"
        )
    if not any(path.iterdir()):
        raise StateError(f"--state-dir {path} is empty: no client state here (e.g. {EXAMPLE})")
    if (path / "state.key").is_file() or path.name.startswith("client-"):
        raise StateError(f"no personal state in {path}: this client has not taken part in a round yet")
    raise StateError(
        f"--state-dir {path} holds no {STATE_FILE} and no client folders: not a client's state folder "
        f"(e.g. {EXAMPLE})"
    )


def _clients_below(path: Path) -> tuple[str, list[Path]]:
    """(what ``path`` is, the client folders under it): a clients, mode, run or comparison folder."""
    for kind, pattern in (
        ("a folder of client states", "client-*"),
        ("a run (or mode) folder", "clients/client-*"),
        ("a folder of runs or modes", "*/clients/client-*"),
    ):
        found = sorted(p for p in path.glob(pattern) if p.is_dir())
        if found:
            return kind, found
    return "", []


def _listing(clients: list[Path]) -> str:
    """Up to SHOWN client folders, each with its user from ``users.json`` when there is one."""
    shown = [f"{c}{_user(c)}" for c in clients[:SHOWN]]
    more = f" … ({len(clients)} in all)" if len(clients) > SHOWN else ""
    return ", ".join(shown) + more


def user_of(client: Path) -> str | None:
    """The user a simulated client's state folder belongs to (``users.json`` beside it, written by the
    runner on this machine), or None (a deployed device, or no mapping)."""
    try:
        users = json.loads((client.parent / USER_MAP).read_text())
    except (OSError, ValueError):
        return None
    user = users.get(client.name) if isinstance(users, dict) else None
    return str(user) if user else None


def _user(client: Path) -> str:
    """`` (user)`` from the simulation's ``users.json`` beside the client folders, else ``""``."""
    user = user_of(client)
    return f" ({user})" if user else ""
