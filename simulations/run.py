"""Local federated simulations on Flower's simulation engine (the same ServerApp/ClientApp as ``flwr run``).

A simulation config is a TOML file with a ``[simulation]`` table (engine settings) and a ``[run-config]``
table (dotted keys of ``[tool.flwr.app.config]``; anything not given takes the pyproject default).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
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

ENGINE_KEYS = ("num-clients", "client-cpus", "client-gpus", "ray-address", "compare", "mode-settings")
SIM_KEYS = {*ENGINE_KEYS, *DEVICE_KEYS}
_HOST_PORT = re.compile(r"^(?P<host>[^\s:/]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
PATH_KEYS = ("task.data-path", "client.state-root", "client.feature-cache", "output.ledger")  # run-config
PROBE_SECONDS = 3.0  # how long `check_ray_cluster` waits for a TCP answer from the cluster's GCS


@dataclass(frozen=True)
class SimSettings:
    """Engine settings of a simulation (not part of the app's run config)."""

    num_clients: int = 4
    client_cpus: float = 1.0
    compare: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    per_mode: dict[str, dict[str, Any]] = field(default_factory=dict)  # [mode.<name>] tables
    limits: dict[str, Any] = field(default_factory=dict)  # the simulated devices' max-epsilon, delta, ...
    client_gpus: float = 0.0  # GPUs per simulated client (a Ray resource; fractions share one GPU)
    ray_address: str = ""  # "" = start a local Ray; "host:port" or "auto" = join that running cluster

    def for_mode(self, mode: str | None = None) -> dict[str, Any]:
        """The run config of ``mode`` (default: the configured one): overrides + that mode's table."""
        mode = mode or Config.from_run_config(self.overrides).personalization.mode
        return {**self.overrides, **self.per_mode.get(mode, {}), "personalization.mode": mode}


def load_settings(
    path: str | Path | None, sets: dict[str, Any] | None = None, modes: Sequence[str] = ()
) -> SimSettings:
    """Read a simulation TOML (or none) plus ``--set`` overrides into SimSettings.

    The run config of every mode that will run (``modes``, else the TOML's ``compare``, else the configured
    mode) is validated here, before any engine starts.
    """
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
    compare = tuple(sim.get("compare", ()))
    for mode in tuple(modes) or compare or (None,):  # validate early, before any engine starts
        extra = {} if mode is None else {**per_mode.get(mode, {}), "personalization.mode": mode}
        Config.from_run_config({**overrides, **extra})
    for mode in per_mode:
        Config.from_run_config({**overrides, **per_mode[mode], "personalization.mode": mode})
    num = int(sim.get("num-clients", 4))
    if num < 1:
        raise ConfigError("[simulation] num-clients must be ≥ 1")
    limits = _device_limits(sim)
    address = ray_address(sim["ray-address"], "[simulation] ray-address") if "ray-address" in sim else ""
    return SimSettings(
        num,
        float(sim.get("client-cpus", 1.0)),
        compare,
        overrides,
        per_mode,
        limits,
        client_gpus=client_gpus(sim.get("client-gpus", 0.0), "[simulation] client-gpus"),
        ray_address=address,
    )


def client_gpus(value: Any, name: str) -> float:
    """GPUs per simulated client if Ray accepts ``value`` (a number ≥ 0, whole above 1), else ConfigError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a number ≥ 0 (GPUs per simulated client), got {value!r}")
    if value > 1 and value != int(value):
        raise ConfigError(f"{name} above 1 must be a whole number of GPUs (Ray's rule), got {value!r}")
    return float(value)


def ray_address(value: Any, name: str) -> str:
    """A Ray cluster address (``host:port`` of its head, or ``auto``) if well-formed, else ConfigError."""
    text = value.strip() if isinstance(value, str) else None
    match = _HOST_PORT.match(text) if text else None
    if text != "auto" and (match is None or not 0 < int(match["port"]) < 65536):
        raise ConfigError(f"{name} must be the head's host:port (e.g. 10.0.0.5:6379) or auto, got {value!r}")
    return str(text)


def check_ray_cluster(address: str, timeout: float = PROBE_SECONDS) -> str:
    """The address Ray will dial for ``address``, once something answers there; else FedpersError.

    Ray's own ``ray.init(address=...)`` retries an address where nothing listens for minutes, so a
    wrong address is refused here in a few seconds instead. Ray resolves ``auto`` (``RAY_ADDRESS``, then
    the latest ``ray start`` on this machine) and replaces 127.0.0.1 / localhost with this machine's
    node address; the probe dials what Ray will dial.
    """
    from ray._private.services import canonicalize_bootstrap_address

    try:
        target = canonicalize_bootstrap_address(address) or ""
    except (ConnectionError, ValueError) as exc:
        raise FedpersError(f"no Ray cluster found for ray-address {address!r}: {exc}") from exc
    host, _, port = target.rpartition(":")
    via = f" (Ray's address for {address})" if target != address else ""
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise FedpersError(
            f"no Ray cluster answers at {target}{via} ({exc.strerror or type(exc).__name__}); start its head "
            "with `ray start --head` or correct ray-address"
        ) from exc
    return target


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
    (simulations.local_grid), instead of Ray. ``settings.ray_address``: the clients run on that
    existing Ray cluster, which is left running at the end.
    """
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from common.assets import ensure
    from common.runs import client_state_dir
    from server import recorder
    from server.app import make_server_app
    from simulations import flower_poller
    from simulations.local_grid import run_local
    from simulations.preflight import write_user_map

    if settings.ray_address and sequential:
        raise ConfigError("ray-address joins a Ray cluster; a sequential run uses no Ray")
    if settings.ray_address:
        check_ray_cluster(settings.ray_address)
        run_dir = run_dir.resolve()  # clients keep their state under it; cluster workers have their own cwd
    run_config = settings.for_mode()
    cfg = Config.from_run_config(run_config)
    needed = {cfg.task.dataset} - set(USER_FILE_DATASETS)  # the user's own file is no asset
    needed.add("minilm" if cfg.model.name == "minilm" else "tweets")  # the tiny tokenizer trains on tweets
    for name in sorted(needed):
        ensure(name)
    overrides = {**run_config, "output.run-dir": str(run_dir)}
    if settings.ray_address:  # the cluster's workers run in their own folder, with their own environment
        overrides |= {k: str(Path(v).expanduser().resolve()) for k in PATH_KEYS if (v := overrides.get(k))}
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
            flower_poller.install()  # Flower's poller would sweep nodes × stored messages every 0.1 s
            run_simulation(
                server_app=make_server_app(overrides, users, by_partition=True),
                client_app=make_client_app(overrides, settings.limits),
                num_supernodes=settings.num_clients,
                backend_config=backend_config(settings),
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


def backend_config(settings: SimSettings) -> dict[str, Any]:
    """Flower's Ray backend config: each client's resources, and how Ray starts or is joined.

    Joining a cluster passes only its address: Ray refuses num_cpus / num_gpus there (the cluster's
    nodes own their sizes). Flower's backend ends with ``ray.shutdown()``, which on a driver that joined
    a cluster only disconnects it (it started none of the cluster's processes).
    """
    resources = {"num_cpus": settings.client_cpus, "num_gpus": settings.client_gpus}
    if settings.ray_address:
        return {"client_resources": resources, "init_args": {"address": settings.ray_address}}
    init = {"num_cpus": max(os.cpu_count() or 1, int(settings.client_cpus))}
    return {"client_resources": resources, "init_args": init}


def _first_refusal(run_dir: Path) -> str:
    """The first refusal or rejection a run's metrics.jsonl records (why no client took part)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in map(json.loads, filter(str.strip, lines)):
        for reason in line.get("refusals", []) + line.get("rejections", []):
            return str(reason)
    return "no reply arrived"
