"""Local federated simulations on Flower's simulation engine (the same ServerApp/ClientApp as ``flwr run``).

A simulation config is a TOML file with a ``[simulation]`` table (engine settings) and a ``[run-config]``
table (dotted keys of ``[tool.flwr.app.config]``; anything not given takes the pyproject default).
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import (
    DEVICE_KEYS,
    MODES,
    USER_FILE_DATASETS,
    Config,
    ConfigError,
    load_overrides_toml,
    validate_device_limits,
    validate_keys,
)
from common.errors import FedpersError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

SIM_KEYS = {"num-clients", "client-cpus", "compare", "mode-settings", *DEVICE_KEYS}


@dataclass(frozen=True)
class SimSettings:
    """Engine settings of a simulation (not part of the app's run config)."""

    num_clients: int = 4
    client_cpus: float = 1.0
    compare: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    per_mode: dict[str, dict[str, Any]] = field(default_factory=dict)  # [mode.<name>] tables
    limits: dict[str, Any] = field(default_factory=dict)  # the simulated devices' max-epsilon, delta, ...

    def for_mode(self, mode: str | None = None) -> dict[str, Any]:
        """The run config of ``mode`` (default: the configured one): overrides + that mode's table."""
        mode = mode or Config.from_run_config(self.overrides).personalization.mode
        return {**self.overrides, **self.per_mode.get(mode, {}), "personalization.mode": mode}


def load_settings(path: str | Path | None, sets: dict[str, Any] | None = None) -> SimSettings:
    """Read a simulation TOML (or none) plus ``--set`` overrides into SimSettings."""
    sim: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    per_mode: dict[str, dict[str, Any]] = {}
    if path is not None:
        data = _read_toml(Path(path))
        sim = data.get("simulation", {})
        overrides = load_overrides_toml(path)
        unknown = set(sim) - SIM_KEYS
        if unknown:
            raise ConfigError(
                f"unknown [simulation] keys {sorted(unknown)} in {path}; allowed: {sorted(SIM_KEYS)}"
            )
        if sim.get("mode-settings"):  # e.g. the tuned file `fedpers bench lm-tune` writes
            per_mode = _mode_tables(Path(path).parent / str(sim["mode-settings"]))
        for mode, table in _mode_tables(Path(path), data).items():
            per_mode.setdefault(mode, {}).update(table)
    explicit = validate_keys(sets or {})
    overrides.update(explicit)
    per_mode = {m: {k: v for k, v in t.items() if k not in explicit} for m, t in per_mode.items()}
    Config.from_run_config(overrides)  # validate early, before any engine starts
    for mode in per_mode:
        Config.from_run_config({**overrides, **per_mode[mode], "personalization.mode": mode})
    num = int(sim.get("num-clients", 4))
    if num < 1:
        raise ConfigError("[simulation] num-clients must be ≥ 1")
    compare = tuple(sim.get("compare", ()))
    limits = _device_limits(sim)
    return SimSettings(num, float(sim.get("client-cpus", 1.0)), compare, overrides, per_mode, limits)


def _read_toml(path: Path) -> dict[str, Any]:
    """A simulation TOML's tables; a missing, unreadable or malformed file is one ConfigError line."""
    if not path.is_file():
        raise ConfigError(f"simulation config {path} does not exist (see simulations/configs/*.toml)")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"simulation config {path} is not valid TOML: {exc}") from exc


def _device_limits(sim: dict[str, Any]) -> dict[str, Any]:
    """The simulated devices' own limits from ``[simulation]`` (as ``fedpers agent`` takes them as flags)."""
    limits = {k: sim[k] for k in DEVICE_KEYS if k in sim}
    return validate_device_limits(limits, lambda key: f"[simulation] {key}")


def _mode_tables(path: Path, data: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The ``[mode.<name>]`` tables of a TOML file (``data``: already parsed): overrides for one mode only."""
    if data is None:
        if not path.is_file():
            raise ConfigError(f"mode settings file {path} does not exist ([simulation] mode-settings)")
        data = _read_toml(path)
    tables = data.get("mode", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{path}: [mode.<name>] must be tables of run-config keys")
    unknown = sorted(set(tables) - set(MODES))
    if unknown:
        raise ConfigError(f"{path}: unknown mode(s) {unknown} in [mode.<name>]; allowed: {', '.join(MODES)}")
    return {str(m): validate_keys(t) for m, t in tables.items()}


def new_run_id(prefix: str) -> str:
    """A sortable, unique run folder name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def simulate(
    settings: SimSettings,
    run_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    users: Mapping[int, str] | None = None,
    sequential: bool = False,
) -> dict[str, Any]:
    """Run one federation in-process on Flower's simulation engine; returns the run summary.

    ``users`` (from simulations.preflight): each partition's user, written into clients.csv, report.md
    and the client state folder's users.json by this process; clients never send it. ``sequential``:
    the same ServerApp federation and ClientApps over an in-process grid, one client after another
    (simulations.local_grid), instead of Ray.
    """
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from common.assets import ensure
    from common.runs import client_state_dir
    from server import recorder
    from server.app import make_server_app
    from simulations.local_grid import run_local
    from simulations.preflight import write_user_map

    run_config = settings.for_mode()
    cfg = Config.from_run_config(run_config)
    needed = {cfg.task.dataset} - set(USER_FILE_DATASETS)  # the user's own file is no asset
    needed.add("minilm" if cfg.model.name == "minilm" else "tweets")  # the tiny tokenizer trains on tweets
    for name in sorted(needed):
        ensure(name)
    overrides = {**run_config, "output.run-dir": str(run_dir)}
    if cfg.fed.min_clients > settings.num_clients:
        overrides["fed.min-clients"] = settings.num_clients
    if cfg.train.threads == 0:
        overrides["train.threads"] = max(1, int(settings.client_cpus))
    if on_round:
        recorder.ROUND_LISTENERS.append(on_round)
    try:
        if sequential:
            run_local(overrides, settings.num_clients, settings.limits, users)
        else:
            run_simulation(
                server_app=make_server_app(overrides, users, by_partition=True),
                client_app=make_client_app(overrides, settings.limits),
                num_supernodes=settings.num_clients,
                backend_config={
                    "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": 0.0},
                    "init_args": {"num_cpus": max(os.cpu_count() or 1, int(settings.client_cpus))},
                },
            )
    finally:
        if on_round:
            recorder.ROUND_LISTENERS.remove(on_round)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}")
    if users:
        write_user_map(client_state_dir(Config.from_run_config(overrides), 0, 0).parent, users)
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    if not summary.get("clients"):
        raise FedpersError(f"no client took part in any round of {run_dir}: {_first_refusal(run_dir)}")
    return summary


def _first_refusal(run_dir: Path) -> str:
    """The first refusal or rejection a run's metrics.jsonl records (why no client took part)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in map(json.loads, filter(str.strip, lines)):
        for reason in line.get("refusals", []) + line.get("rejections", []):
            return str(reason)
    return "no reply arrived"
