"""Per-round checkpoints of the shared tensors, so a killed server resumes where it stopped."""

from __future__ import annotations

import io
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError
from common.fileio import write_bytes_atomic, write_json_atomic

PACKAGES = ("flwr", "torch", "transformers", "peft", "opacus", "numpy")
# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = (
    "fed.num-rounds",
    "fed.round-timeout",
    "output.resume",
    "fed.fraction-evaluate",
    "fed.evaluate-every",
    "train.threads",
)


@dataclass
class Checkpoint:
    """The state of a federation after ``server_round`` rounds."""

    server_round: int
    arrays: dict[str, np.ndarray]
    run_config: dict[str, Any]
    velocity: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's momentum


def versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def save(folder: str | Path, ckpt: Checkpoint) -> None:
    """Write ``arrays.npz`` then ``checkpoint.json`` (the JSON names the round; written last)."""
    folder = Path(folder)
    buf = io.BytesIO()
    tensors = {f"a{i}": ckpt.arrays[k] for i, k in enumerate(sorted(ckpt.arrays))}
    tensors |= {f"v{i}": ckpt.velocity[k] for i, k in enumerate(sorted(ckpt.velocity))}
    np.savez(buf, **tensors)  # type: ignore[arg-type]
    write_bytes_atomic(folder / f"arrays-{ckpt.server_round:04d}.npz", buf.getvalue())
    write_json_atomic(
        folder / "checkpoint.json",
        {
            "round": ckpt.server_round,
            "names": sorted(ckpt.arrays),
            "velocity_names": sorted(ckpt.velocity),
            "run_config": ckpt.run_config,
            "versions": versions(),
        },
    )
    for old in folder.glob("arrays-*.npz"):
        if old.name != f"arrays-{ckpt.server_round:04d}.npz":
            old.unlink(missing_ok=True)


def load(folder: str | Path) -> Checkpoint | None:
    """The latest checkpoint in ``folder``, or None."""
    meta_path = Path(folder) / "checkpoint.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    with np.load(Path(folder) / f"arrays-{meta['round']:04d}.npz", allow_pickle=False) as npz:
        arrays = {name: npz[f"a{i}"] for i, name in enumerate(meta["names"])}
        velocity = {name: npz[f"v{i}"] for i, name in enumerate(meta.get("velocity_names", []))}
    return Checkpoint(int(meta["round"]), arrays, dict(meta["run_config"]), velocity)


def check_compatible(ckpt: Checkpoint, run_config: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made with a different configuration.

    A key the checkpoint does not know (added to fedpers after it was written) counts at its default.
    """
    from common.config import default_run_config

    old = {**default_run_config(), **ckpt.run_config}
    diff = sorted(
        k for k in set(old) | set(run_config) if k not in RESUMABLE_KEYS and old.get(k) != run_config.get(k)
    )
    if diff:
        raise ConfigError(
            f"the run folder holds a checkpoint of another configuration (differs in {', '.join(diff)}); "
            "use a new output.run-dir, or output.resume=false to start over"
        )
