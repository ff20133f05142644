"""Where a run's files live (the same rule on server and clients)."""

from __future__ import annotations

from pathlib import Path

from common.config import Config


def run_dir(cfg: Config, run_id: int) -> Path:
    """``output.run-dir`` if set, else ``runs/flwr-<run id>``."""
    return Path(cfg.output.run_dir) if cfg.output.run_dir else Path("runs") / f"flwr-{run_id}"


def client_state_dir(cfg: Config, run_id: int, partition_id: int) -> Path:
    """A simulated client's state folder: under ``client.state-root`` or the run folder."""
    root = (
        Path(cfg.client.state_root).expanduser()
        if cfg.client.state_root
        else run_dir(cfg, run_id) / "clients"
    )
    return root / f"client-{partition_id:04d}"


def client_cache_dir(cfg: Config, partition_id: int) -> Path | None:
    """A simulated client's feature-cache folder under ``client.feature-cache`` (``None`` when off)."""
    if not cfg.client.feature_cache:
        return None
    return Path(cfg.client.feature_cache).expanduser() / f"client-{partition_id:04d}"
