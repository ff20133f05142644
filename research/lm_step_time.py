"""Time one SmolLM2 training step (forward + backward): full vocabulary projection vs scored positions.

``python -m research.lm_step_time``: 20 chat turns of the first Shakespeare role, one thread, the median
of three repeats of each variant. Both variants give the same losses (tests/test_chat_format.py).
"""

from __future__ import annotations

import statistics
import time
import tomllib

import torch

from common.config import Config
from common.data import load_client_data
from common.features import encode
from common.tasks import get_backbone, get_task
from common.tasks.generate import reference_losses
from simulations.bench.lm_tune import WORKLOAD


def main() -> None:
    """Print the step time of both variants."""
    torch.set_num_threads(1)
    with WORKLOAD.open("rb") as fh:
        cfg = Config.from_run_config(tomllib.load(fh)["run-config"])
    backbone = get_backbone(cfg)
    data = load_client_data(cfg.task, 0, 20)
    feats = encode(
        backbone,
        data.train_texts[:40],
        None,
        cfg.task.max_length,
        prompts=data.train_prompts[:40],
    )
    model = backbone.new_model()
    h, m, y = feats.batch(torch.arange(20))
    print(f"batch {tuple(m.shape)} tokens, {int((y != -100).sum())} scored")
    variants = {
        "full projection": lambda: reference_losses(model(h, m), y),
        "scored positions only": lambda: get_task(cfg).losses(model, h, m, y),
    }
    for name, losses in variants.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            losses().sum().backward()
            times.append(time.perf_counter() - t0)
        print(f"{name}: {statistics.median(times):.2f} s per step")


if __name__ == "__main__":
    main()
