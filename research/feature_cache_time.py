"""Time the frozen prefix per user: computed, written to the encrypted feature cache, read back.

``python -m research.feature_cache_time [--users N]``: the first N users of the Shakespeare workload
(SmolLM2, 28 frozen blocks, chat turns), train + test speeches, one thread. "compute" runs the prefix,
"compute + write" is what the first mode of a ``--compare`` pays with the cache on, "read" what every later
mode (or run) pays instead. Each measurement starts from an empty per-process cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from client.feature_cache import FeatureCache
from common import features
from common.config import Config
from common.data import load_client_data
from common.features import encode
from common.tasks import get_backbone
from simulations.bench.lm_tune import WORKLOAD


def _time_user(cfg: Config, backbone: features.Backbone, user: int, folder: Path) -> tuple[float, ...]:
    data = load_client_data(cfg.task, user, 20)
    splits = [(getattr(data, f"{s}_texts"), getattr(data, f"{s}_prompts")) for s in ("train", "test")]
    times = []
    for store in (None, FeatureCache(folder / f"user-{user}"), FeatureCache(folder / f"user-{user}")):
        features._CACHE.clear()
        start = time.perf_counter()
        for texts, prompts in splits:
            encode(backbone, texts, None, cfg.task.max_length, prompts=prompts, store=store)
        times.append(time.perf_counter() - start)
    size = sum(p.stat().st_size for p in (folder / f"user-{user}").glob("*.features"))
    return (*times, size / 2**20)


def main() -> None:
    """Print one line per user and the totals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3, help="how many of the 20 roles (default 3)")
    args = parser.parse_args()
    if not 1 <= args.users <= 20:
        raise SystemExit("--users must be in 1..20")
    torch.set_num_threads(1)
    with WORKLOAD.open("rb") as fh:
        cfg = Config.from_run_config(tomllib.load(fh)["run-config"])
    backbone = get_backbone(cfg)
    features.prefix_digest(backbone.prefix)  # once per process, not per user
    print("| user | compute s | compute + write s | read s | MiB on disk |\n|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for user in range(args.users):
            rows.append(_time_user(cfg, backbone, user, Path(tmp)))
            print(f"| {user} | " + " | ".join(f"{v:.2f}" for v in rows[-1]) + " |", flush=True)
    total = [sum(col) for col in zip(*rows, strict=True)]
    print("| all | " + " | ".join(f"{v:.2f}" for v in total) + " |")


if __name__ == "__main__":
    main()
