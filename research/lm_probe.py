"""Diagnostic: what one user's DP training can do to their validation perplexity, per training variant.

    python -m research.lm_probe [--users 4] [--variant NAME=key=value,key=value ...] [--set key=value ...]

Each user of ``simulations/configs/shakespeare.toml`` (validation split: the tail of their training
speeches, never the test ones) trains alone under DP-SGD at the configured ε for every variant: the
personal part only (the shared LoRA stays pretrained) or LoRA and personal part together. It prints the
validation perplexity before and after, and the median per-example gradient norm of the personal part and
of the LoRA tensors against the clipping norm (what one clipping norm does to each). This is no federation:
it bounds what a personal part can add on top of whatever the shared part learns.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import tomllib
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule

from client.training import DPPlan, sample_rate, steps_per_epoch, train
from common.config import Config, parse_set_options
from common.data import load_client_data
from common.features import Features, encode
from common.privacy import calibrate_sigma
from common.split import split_names
from common.tasks import get_backbone, get_task
from common.tasks.generate import next_token_loss
from research.grad_norms import median_norms

WORKLOAD = Path(__file__).resolve().parent / "configs" / "shakespeare.toml"


def _parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value[,key=value...]")
    over: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        over.update(parse_set_options([item]))
    return name, over


def _grad_norms(cfg: Config, model: torch.nn.Module, feats: Features, n: int = 20) -> tuple[float, float]:
    """Median per-example gradient norm of the personal part and of the LoRA tensors (trainable only)."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    h, m, y = feats.batch(torch.arange(min(n, len(feats))))
    get_task(cfg).losses(gsm, h, m, y).sum().backward()
    norms = median_norms(model)
    gsm._close()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = None  # type: ignore[attr-defined]
    return norms["head-median"], norms["lora-median"]


def probe(cfg: Config, train_feats: Features, val_feats: Features, what: str) -> dict[str, float]:
    """Train one user's model under DP (``what`` = ``personal`` or ``both``); validation ppl and norms."""
    backbone = get_backbone(cfg)
    model = backbone.new_model()
    roles = split_names([n for n, _ in model.named_parameters()], "fedper")
    trainable = set(roles["personal"]) | (set(roles["shared"]) if what == "both" else set())
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    head_norm, lora_norm = _grad_norms(cfg, model, train_feats)
    n = len(train_feats)
    q = sample_rate(n, cfg.train.batch_size)
    steps = cfg.fed.num_rounds * cfg.train.local_epochs * steps_per_epoch(n, cfg.train.batch_size)
    delta = cfg.dp.delta or 1.0 / n  # the client's rule (client.node)
    sigma = cfg.dp.noise_multiplier or calibrate_sigma(
        budget=cfg.dp.epsilon,
        delta=delta,
        sample_rate=q,
        steps=steps,
        history=[],
        accountant=cfg.dp.accountant,
    )
    train(
        model,
        train_feats,
        cfg,
        epochs=cfg.fed.num_rounds * cfg.train.local_epochs,
        plan=DPPlan(sigma, q, delta),
        history=[],
        seed=0,
    )
    loss = next_token_loss(model, val_feats)
    return {"ppl": math.exp(loss), "sigma": sigma, "head-norm": head_norm, "lora-norm": lora_norm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value,key=value")
    ap.add_argument("--what", choices=["personal", "both"], default="personal")
    ap.add_argument("--set", action="append", default=[], help="run-config override for every variant")
    args = ap.parse_args()
    with WORKLOAD.open("rb") as fh:
        data = tomllib.load(fh)
    num_users = int(data["simulation"]["num-clients"])
    base = {
        **data["run-config"],
        "task.evaluate-on": "validation",
        "train.threads": 1,
        **parse_set_options(args.set),
    }
    variants = dict(_parse_variant(v) for v in args.variant) or {"as-configured": {}}
    cfg0 = Config.from_run_config(base)
    backbone = get_backbone(cfg0)  # the frozen prefix is the same for every variant
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    before: list[float] = []
    for user in range(args.users):
        t0 = time.perf_counter()
        d = load_client_data(cfg0.task, user, num_users)
        tr = encode(backbone, d.train_texts, None, cfg0.task.max_length)
        va = encode(backbone, d.test_texts, None, cfg0.task.max_length)
        before.append(math.exp(next_token_loss(backbone.new_model(), va)))
        print(
            f"user {user}: {len(tr)} train / {len(va)} validation speeches, pretrained ppl {before[-1]:.2f}"
        )
        for name, over in variants.items():
            r = probe(Config.from_run_config({**base, **over}), tr, va, args.what)
            results[name].append(r)
            print(
                f"  {name:>18}: ppl {r['ppl']:8.2f}  σ {r['sigma']:.2f}  grad norm head {r['head-norm']:.3f}"
                f" lora {r['lora-norm']:.3f}"
            )
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\ntrained: {args.what}; pretrained mean ppl {statistics.fmean(before):.2f}")
    for name, rows in results.items():
        ratio = statistics.fmean(r["ppl"] / b for r, b in zip(rows, before, strict=True))
        mean = statistics.fmean(r["ppl"] for r in rows)
        print(f"{name:>18}: mean ppl {mean:8.2f} (x{ratio:.3f} of pretrained)")


if __name__ == "__main__":
    main()
