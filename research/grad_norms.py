"""Diagnostic: per-example gradient norms of the head vs the LoRA tensors on one client's data.

    python -m research.grad_norms [--set key=value ...]

Explains how a single DP clipping norm is shared between head and LoRA (see README, "Why fedper ≈ local").
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from common.config import Config, parse_set_options
from common.data import load_client_data
from common.features import encode
from common.tasks import get_backbone


def grad_norms(
    cfg: Config, partition_id: int = 0, num_partitions: int = 20, batch: int = 50
) -> dict[str, float]:
    """Median per-example gradient norm of the head and of all LoRA tensors together."""
    torch.manual_seed(0)
    backbone = get_backbone(cfg)
    data = load_client_data(cfg.task, partition_id, num_partitions)
    feats = encode(backbone, data.train_texts, data.train_labels, cfg.task.max_length)
    model = backbone.new_model()
    with torch.no_grad():  # lora_B starts at 0 (then lora_A has no gradient): look slightly off zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    gsm = GradSampleModule(model, loss_reduction="sum")
    h, m, y = feats.batch(slice(0, batch))
    F.cross_entropy(gsm(h, m), y, reduction="sum").backward()
    return median_norms(model)


def median_norms(model: torch.nn.Module) -> dict[str, float]:
    """Median per-example gradient norm of the personal part (``head.*``) and of the other trainable
    tensors together (the LoRA), read from Opacus' ``grad_sample`` after one backward pass."""
    sq: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        sample = getattr(p, "grad_sample", None)
        if p.requires_grad and sample is not None:
            key = "head" if name.startswith("head.") else "lora"
            sq[key] = sq.get(key, 0) + sample.flatten(1).pow(2).sum(1)
    return {f"{k}-median": float(sq[k].sqrt().median()) if k in sq else 0.0 for k in ("head", "lora")}


def main() -> None:
    """Print the medians for the default (or ``--set``) configuration."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    print(grad_norms(Config.from_run_config(parse_set_options(args.set))))


if __name__ == "__main__":
    main()
