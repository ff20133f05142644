"""`fedpers simulate` checks every data file and every client's share before anything starts.

A bad file is one `error:` line on stderr, exit 2, and no run folder (Flower path, --compare and
--sequential alike); the users of a file are selected by task.min-examples / task.max-users, largest first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import Config
from common.data import load_client_data
from common.errors import ConfigError, DataError
from common.users import select_users
from simulations.preflight import check_clients

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT / "simulations" / "configs" / "reviews.toml"
ENV = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}

BAD_FILES: dict[str, tuple[str, bytes, str]] = {  # case: (file name, content, expected in the error)
    "no-label-column": ("d.csv", b"text,user\nfine kettle,ana\n", "lacks column(s) 'label'"),
    "unknown-label": ("d.csv", b"text,label,user\nfine kettle,meh,ana\n", "unknown label 'meh'"),
    "header-only": ("d.csv", b"text,label,user\n", "has no examples"),
    "non-utf8": ("d.csv", b"text,label,user\ncaf\xe9 au lait,pos,ana\n", "is not UTF-8 text (line 2)"),
    "missing-path": ("", b"", "does not exist (task.data-path)"),
    "broken-jsonl": (
        "d.jsonl",
        b'{"text": "fine", "label": "pos", "user": "ana"}\n{"text": "b", "label"\n',
        "line 2 is not valid JSON",
    ),
}


def _simulate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`fedpers simulate -c reviews.toml ARGS --run-dir tmp/run` from the repository root."""
    argv = [str(BIN / "fedpers"), "simulate", "-c", str(REVIEWS), *args, "--run-dir", str(tmp_path / "run")]
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("runner", ["flower", "compare", "sequential"])
def test_a_bad_data_file_stops_simulate_before_any_run_folder(tmp_path: Path, case: str, runner: str) -> None:
    name, content, expected = BAD_FILES[case]
    path = tmp_path / (name or "missing.csv")
    if name:
        path.write_bytes(content)
    extra = {"flower": [], "compare": ["--compare", "fedper,local"], "sequential": ["--sequential"]}[runner]
    result = _simulate(tmp_path, "--set", f"task.data-path={str(path)!r}", *extra)
    _one_error_line(result, expected)
    assert not (tmp_path / "run").exists()


def test_more_clients_than_qualifying_users_is_an_error(tmp_path: Path) -> None:
    result = _simulate(tmp_path, "--clients", "5")  # 5 users, 4 of them with >= task.min-examples rows
    _one_error_line(result, "num-clients = 5 but only 4 of the 5 users")
    assert not (tmp_path / "run").exists()
    capped = _simulate(tmp_path, "--set", "task.max-users=2", "--sequential")
    _one_error_line(capped, "only 2 of the 5 users")


def test_an_existing_run_folder_is_never_removed(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "earlier.txt").write_text("keep me")
    _one_error_line(_simulate(tmp_path, "--clients", "9"), "only 4 of the 5 users")
    assert (tmp_path / "run" / "earlier.txt").read_text() == "keep me"


def _task(path: Path, **extra: object) -> Config:
    keys = {"task.dataset": "file", "task.data-path": str(path), "task.labels": "neg,pos"}
    sizes = {"task.train-size": 4, "task.test-size": 2, "model.name": "tiny"}
    return Config.from_run_config({**keys, **sizes, **extra})


def _users_file(tmp_path: Path, counts: dict[str, int]) -> Path:
    rows = [f"{u} says {i},{'pos' if i % 2 else 'neg'},{u}" for u, n in counts.items() for i in range(n)]
    path = tmp_path / "users.csv"
    path.write_text("text,label,user\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_users_are_taken_largest_first_ties_by_name(tmp_path: Path) -> None:
    path = _users_file(tmp_path, {"zoe": 5, "amy": 5, "bo": 9, "cy": 2})
    cfg = _task(path, **{"task.min-examples": 3})
    chosen = select_users(["zoe"] * 5 + ["amy"] * 5 + ["bo"] * 9 + ["cy"] * 2, cfg.task)
    assert chosen.kept == ("bo", "amy", "zoe") and chosen.too_small == ("cy",)
    roster = check_clients(cfg.to_run_config(), 2)
    assert roster.users == {0: "bo", 1: "amy"}
    assert "2 of 4 users taken" in roster.note and "bo (9), amy (5)" in roster.note
    assert "1 with fewer than task.min-examples" in roster.note and "1 beyond num-clients" in roster.note
    assert load_client_data(cfg.task, 2, 3).user == "zoe"
    capped = _task(path, **{"task.min-examples": 3, "task.max-users": 1})
    with pytest.raises(DataError, match="only 1 of the 4 users"):
        check_clients(capped.to_run_config(), 2)


def test_a_too_small_user_is_named_unless_min_examples_leaves_it_out(tmp_path: Path) -> None:
    path = _users_file(tmp_path, {"amy": 6, "cy": 2})
    with pytest.raises(DataError, match=r"\(cy\) has only 2 examples.*task.min-examples = 3"):
        check_clients(_task(path).to_run_config(), 2)
    assert check_clients(_task(path, **{"task.min-examples": 3}).to_run_config(), 1).users == {0: "amy"}


def test_selection_keys_are_refused_where_they_do_not_apply(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task.max-users = 3 applies only to task.dataset = 'file' or"):
        Config.from_run_config({"task.max-users": 3})  # tweets: no users to select
    no_users = tmp_path / "plain.csv"
    no_users.write_text("text,label\n" + "".join(f"t{i},{'pos' if i % 2 else 'neg'}\n" for i in range(9)))
    with pytest.raises(ConfigError, match="has no user column"):
        check_clients(_task(no_users, **{"task.min-examples": 2}).to_run_config(), 2)
