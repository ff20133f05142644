"""Cached prefix features are the frozen layers' output: running the whole encoder gives the same logits."""

from __future__ import annotations

import numpy as np
import torch
from conftest import TINY

from common.config import Config
from common.data import load_client_data
from common.features import encode
from common.tasks import get_backbone


def test_length_sorted_chunked_features_equal_a_full_forward() -> None:
    cfg = Config.from_run_config({**TINY, "model.frozen-layers": 1, "task.train-size": 70})
    backbone = get_backbone(cfg)
    data = load_client_data(cfg.task, 0, 4)
    feats = encode(backbone, data.train_texts, data.train_labels, cfg.task.max_length, chunk=16)
    lengths = feats.mask.sum(1)
    assert bool((lengths[1:] >= lengths[:-1]).all())  # rows sorted by length
    assert sorted(feats.labels.tolist()) == sorted(data.train_labels.tolist())
    # Reference: every text padded to the longest, all layers at once (no cache, no chunks).
    enc = backbone.tokenizer(list(data.train_texts), padding="longest", truncation=True,
                             max_length=cfg.task.max_length, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        full = backbone.prefix(enc["input_ids"], enc["attention_mask"])
        model = backbone.new_model().eval()
        ref = model(full, enc["attention_mask"])
        got = torch.cat([model(*feats.batch(slice(i, i + 9))[:2]) for i in range(0, len(feats), 9)])
    by_text = {}
    order = np.argsort(enc["attention_mask"].sum(1).numpy(), kind="stable")
    for row, idx in enumerate(order):
        by_text[row] = ref[idx]
    assert torch.allclose(got, torch.stack([by_text[r] for r in range(len(order))]), atol=1e-5)


def test_the_per_process_cache_keeps_features_up_to_its_byte_budget(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from common import features

    cfg = Config.from_run_config({**TINY, "model.frozen-layers": 1, "task.train-size": 20})
    backbone = get_backbone(cfg)
    data = [load_client_data(cfg.task, p, 4) for p in range(4)]
    features._CACHE.clear()
    one = encode(backbone, data[0].train_texts, data[0].train_labels, cfg.task.max_length)
    monkeypatch.setattr(features, "_CACHE_BYTES", int(2.5 * one.nbytes))
    for d in data[1:]:
        encode(backbone, d.train_texts, d.train_labels, cfg.task.max_length)
    assert (
        1 <= len(features._CACHE) <= 3
        and sum(f.nbytes for f in features._CACHE.values()) <= 2.5 * one.nbytes * 1.5
    )
    assert all(f is not one for f in features._CACHE.values())  # the least recently used went first
