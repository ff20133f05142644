"""A wrong --state-dir (predict, recommend, chat, generate) names what it is and the client folders in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.predict import load_personal
from client.state_dir import check_state_dir
from common.errors import StateError


def _run(root: Path, clients: int, users: dict[str, str] | None = None) -> Path:
    """A run folder with ``clients`` client state folders (each a personal.state) and users.json."""
    for i in range(clients):
        folder = root / "clients" / f"client-{i:04d}"
        folder.mkdir(parents=True)
        (folder / "personal.state").write_bytes(b"x")
    if users is not None:
        (root / "clients" / "users.json").write_text(json.dumps(users))
    return root


def _message(path: Path) -> str:
    with pytest.raises(StateError) as err:
        load_personal(path, command="predict")  # the shared entry point of all four commands
    return str(err.value)


def test_a_client_folder_passes(tmp_path: Path) -> None:
    client = _run(tmp_path, 1) / "clients" / "client-0000"
    assert check_state_dir(client) == client


def test_a_run_or_mode_folder_lists_its_clients_and_users(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 2, {"client-0000": "ana", "client-0001": "ben"})
    msg = _message(run)
    assert "is a run (or mode) folder" in msg
    assert f"{run}/clients/client-0000 (ana), {run}/clients/client-0001 (ben)" in msg
    assert "is a folder of client states" in _message(run / "clients")


def test_a_comparison_folder_lists_every_modes_clients(tmp_path: Path) -> None:
    for mode in ("fedper", "local"):
        _run(tmp_path / "cmp" / mode, 1)
    msg = _message(tmp_path / "cmp")
    assert "folder of runs or modes" in msg and "fedper/clients/client-0000" in msg and "local/clients" in msg


def test_many_clients_are_listed_in_short(tmp_path: Path) -> None:
    msg = _message(_run(tmp_path / "run", 9) / "clients")
    assert "client-0005" in msg and "client-0006" not in msg and "(9 in all)" in msg


def test_not_a_state_folder_says_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text,label\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    assert "nope does not exist" in _message(tmp_path / "nope")
    assert "data.csv is a file, not a client's state folder" in _message(tmp_path / "data.csv")
    assert "empty is empty" in _message(tmp_path / "empty")
    assert "holds no personal.state and no client folders" in _message(tmp_path / "other")


def test_a_client_without_a_round_yet_says_so(tmp_path: Path) -> None:
    client = tmp_path / "clients" / "client-0003"
    client.mkdir(parents=True)
    (client / "state.key").write_text("k")
    assert "has not taken part in a round yet" in _message(client)


def test_chat_banner_names_the_simulated_user_from_the_runners_map(tmp_path: Path) -> None:
    from cli.assistant import banner

    client = tmp_path / "clients" / "client-0000"
    client.mkdir(parents=True)
    assert "(user" not in banner(client, 512)  # no map: a deployed device names no user
    (tmp_path / "clients" / "users.json").write_text('{"client-0000": "OTHELLO"}')
    assert f"assistant of {client} (user OTHELLO)" in banner(client, 512)
