"""Before a simulation starts: read every data file and load every client's share as the client will.

A data error (a missing column, an unknown label, a non-UTF-8 byte, too few users or examples) is raised
here, as one :class:`DataError` / :class:`ConfigError` line, instead of every client refusing every round.
The check also tells the runner which user each simulated client plays: the runner writes that mapping
into the run folder itself, so no user name ever travels in a Flower message.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.state_dir import USER_MAP
from common.config import USER_FILE_DATASETS, Config, TaskConfig
from common.data import file_users
from common.errors import DataError
from common.fileio import write_json_atomic
from common.tasks import get_task
from common.users import select_users
from simulations.run import SimSettings


@dataclass(frozen=True)
class Roster:
    """The user each client plays (partition id → name in the data, or ``client-N``) and a console note."""

    users: dict[int, str]
    note: str  # which users of a file were taken and which left out ("" for the bundled data sets)


def check_clients(run_config: Mapping[str, Any], num_clients: int) -> Roster:
    """Load the share of every one of ``num_clients`` clients under ``run_config``; raise on any problem."""
    cfg = Config.from_run_config(run_config)
    note = _selection(cfg.task, num_clients)
    users = dict(enumerate(get_task(cfg).users(num_clients)))
    return Roster(users, note)


def check_modes(settings: SimSettings, modes: Sequence[str]) -> Roster:
    """:func:`check_clients` for the run config of every mode to run (each distinct task checked once)."""
    rosters: dict[TaskConfig, Roster] = {}
    for mode in modes or (None,):
        run_config = settings.for_mode(mode)
        task = Config.from_run_config(run_config).task
        if task not in rosters:
            rosters[task] = check_clients(run_config, settings.num_clients)
    return next(iter(rosters.values()))


def remove_unfinished(run_dir: Path) -> bool:
    """Remove ``run_dir`` if no mode in it finished (no summary.json); whether it was removed.

    Only for a folder the failing command created itself: a failure leaves no half-made run behind, but
    never deletes a finished mode of a comparison or someone's earlier run.
    """
    if (run_dir / "summary.json").is_file() or any(run_dir.glob("*/summary.json")):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def _selection(task: TaskConfig, num_clients: int) -> str:
    """The console note on the users a file's clients are (DataError if too few qualify)."""
    if task.dataset not in USER_FILE_DATASETS:
        return ""
    users = file_users(task)
    if users is None:  # a labelled file without users: split by label skew like the tweets
        return f"{task.data_path}: no user column, {num_clients} clients by label skew (task.dirichlet-alpha)"
    chosen = select_users(users, task)
    if num_clients > len(chosen.kept):
        raise DataError(
            f"num-clients = {num_clients} but only {len(chosen.kept)} of the {len(chosen.rows)} users in "
            f"{task.data_path} qualify (task.min-examples = {task.min_examples}, task.max-users = "
            f"{task.max_users}): use --clients {len(chosen.kept)} or fewer"
        )
    return f"{task.data_path}: {chosen.describe(num_clients)}"


def write_user_map(states: Path, users: Mapping[int, str]) -> Path:
    """``<states>/users.json``: each client state folder's user (written by the runner, never sent)."""
    path = states / USER_MAP
    write_json_atomic(path, {f"client-{p:04d}": users[p] for p in sorted(users)})
    return path
