"""How well one WNUT-16 user's tagger learns alone, by optimizer setting: the tuning probe of the NER task.

`python -m research.ner_probe --user 3 --epochs 10 --set train.lr-head=0.5` trains user 3's tagger
(no federation) and prints test entity F1 and token accuracy after each epoch block, with and without
DP-SGD (σ from the configured ε over the planned steps). Evaluates on the validation split unless
``--test`` (tuning never reads test).
"""

from __future__ import annotations

import argparse
import time

from client.training import DPPlan, sample_rate, steps_per_epoch, train
from common import protocol as P
from common.config import Config, parse_set_options
from common.privacy import SAMPLE_DELTA, calibrate_sigma, default_delta
from common.tasks import get_task

BASE = {"task.dataset": "wnut16", "task.train-size": 150, "task.test-size": 50, "task.max-length": 80}


def probe(
    cfg: Config, user: int, users: int, epochs: int, every: int, dp: bool
) -> list[tuple[int, float, float]]:
    """(epoch, entity F1, token accuracy) every ``every`` epochs of one user's local training."""
    task = get_task(cfg)
    backbone = task.backbone()
    data = task.load(user, users)
    train_feats, test_feats = task.features(backbone, data, "train"), task.features(backbone, data, "test")
    model = backbone.new_model()
    n, b = len(train_feats), cfg.train.batch_size
    plan = None
    if dp:
        delta, q = default_delta(n, SAMPLE_DELTA), sample_rate(n, b)
        steps = epochs * steps_per_epoch(n, b)
        sigma = calibrate_sigma(
            budget=cfg.dp.epsilon,
            delta=delta,
            sample_rate=q,
            steps=steps,
            history=[],
            accountant=cfg.dp.accountant,
        )
        plan = DPPlan(sigma, q, delta)
    history: list = []
    out = []
    for epoch in range(every, epochs + 1, every):
        result = train(model, train_feats, cfg, epochs=every, plan=plan, history=history, seed=epoch)
        history = result.history
        ev = task.evaluate(model, test_feats)
        out.append((epoch, float(ev.metrics[P.ENTITY_F1]), ev.accuracy))
    return out


def main() -> None:
    """Print the probe's table for the given settings."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--user", type=int, default=3)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--test", action="store_true", help="evaluate on test (default: validation)")
    ap.add_argument("--set", action="append", default=[], help="run-config key=value")
    args = ap.parse_args()
    overrides = {**BASE, **parse_set_options(args.set)}
    if not args.test:
        overrides["task.evaluate-on"] = "validation"
    cfg = Config.from_run_config(overrides)
    for dp in (False, True):
        start = time.perf_counter()
        rows = probe(cfg, args.user, args.users, args.epochs, args.every, dp)
        cells = "  ".join(f"e{e}: F1 {f:.3f} acc {a:.3f}" for e, f, a in rows)
        what = f"DP ε={cfg.dp.epsilon:g}" if dp else "no DP"
        print(f"{what:>8} ({time.perf_counter() - start:.0f} s)  {cells}")


if __name__ == "__main__":
    main()
