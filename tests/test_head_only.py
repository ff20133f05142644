"""``lora.r = 0``: no LoRA, every encoder layer frozen and cached; only the head trains (cross-device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from client.node import NodeInfo, run_train
from client.training import DPPlan, sample_rate, train
from common.config import Config
from common.errors import ConfigError
from common.params import get_arrays
from common.split import split_names
from common.tasks import get_task

HEAD_ONLY = {**TINY_TRAIN, "lora.r": 0, "model.frozen-layers": 4, "personalization.mode": "fedbias"}


def test_only_the_head_trains_under_dp_and_the_whole_encoder_is_the_cached_prefix() -> None:
    cfg = Config.from_run_config(HEAD_ONLY)
    task = get_task(cfg)
    backbone = task.backbone()
    assert len(backbone.prefix.layers) == backbone.prefix.config.num_hidden_layers  # every layer frozen
    model = backbone.new_model()
    assert [n for n, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    feats = task.features(backbone, task.load(0, 4), "train")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = [p.detach().clone() for p in backbone.prefix.parameters()]
    plan = DPPlan(1.0, sample_rate(len(feats), cfg.train.batch_size), 1e-3)
    train(model, feats, cfg, epochs=1, plan=plan, history=[], seed=0)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, backbone.prefix.parameters(), strict=True))


@pytest.mark.parametrize(
    ("mode", "sent"), [("fedbias", {"head.weight"}), ("fedavg", {"head.weight", "head.bias"})]
)
def test_a_node_sends_the_shared_part_of_the_head_only(tmp_path: Path, mode: str, sent: set[str]) -> None:
    cfg = Config.from_run_config({**HEAD_ONLY, "personalization.mode": mode})
    template = get_task(cfg).backbone().template
    names = split_names([n for n, _ in template.named_parameters()], mode)["shared"]
    out, _ = run_train(cfg, NodeInfo(0, 4, tmp_path, run_id=1), get_arrays(template, names), 1)
    assert set(out) == sent


def test_modes_and_keys_that_need_lora_are_refused() -> None:
    for extra, says in (
        ({"personalization.mode": "fedper"}, "shares LoRA tensors"),
        ({"model.frozen-layers": 1}, "has no effect with lora.r = 0"),
        ({"lora.target-modules": "query"}, "has no effect with lora.r = 0"),
    ):
        with pytest.raises(ConfigError, match=says):
            Config.from_run_config({**HEAD_ONLY, **extra})


def test_pooled_features_are_exact_and_small() -> None:
    """Without LoRA the classifier reads the mean token state: pooled once at encode time, the same logits."""
    from common.features import encode

    cfg = Config.from_run_config(HEAD_ONLY)
    task = get_task(cfg)
    backbone, data = task.backbone(), task.load(1, 4)
    pooled = task.features(backbone, data, "train")
    full = encode(backbone, data.train_texts, data.train_labels, cfg.task.max_length)
    assert pooled.hidden.shape[1] == 1 and pooled.nbytes * 5 < full.nbytes
    assert torch.equal(pooled.source, full.source) and torch.equal(pooled.labels, full.labels)
    model = backbone.new_model().eval()
    with torch.no_grad():
        a = model(*pooled.batch(slice(None))[:2])
        b = model(*full.batch(slice(None))[:2])
    assert torch.allclose(a, b, atol=1e-5)


def test_a_pooled_text_met_again_is_not_re_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooled rows are kept per text: a text in a second user's data (news articles) skips the prefix."""
    import common.features as F

    cfg = Config.from_run_config(HEAD_ONLY)
    backbone = get_task(cfg).backbone()
    texts = ["the match went to extra time", "shares fell sharply", "a new film opens", "rain again"]
    n = cfg.task.max_length
    seen: list[int] = []
    real = F.run_prefix
    monkeypatch.setattr(
        F, "run_prefix", lambda b, ids, *a, **k: seen.append(len(ids)) or real(b, ids, *a, **k)
    )
    F._ROWS.clear()
    import numpy as np

    first = F.encode(backbone, texts[:3], np.array([0, 1, 2]), n, pooled=True)
    labels = np.array([2, 0, 0, 2])
    again = F.encode(backbone, [texts[2], texts[3], texts[0], texts[2]], labels, n, pooled=True)
    assert seen == [3, 1]  # the second set ran only its one new text, and a repeat inside a set once
    full = F.encode(backbone, [texts[2], texts[3], texts[0], texts[2]], labels, n)  # every token, recomputed
    mean = full.hidden.sum(1) / full.mask.sum(1, keepdim=True)
    assert torch.equal(again.source, full.source) and torch.equal(again.labels, full.labels)
    assert again.hidden.shape == (4, 1, mean.shape[1])
    assert torch.allclose(again.hidden[:, 0], mean, atol=1e-5)
    row_of = {int(s): i for i, s in enumerate(first.source)}
    assert torch.allclose(first.hidden[row_of[0], 0], again.hidden[list(again.source).index(2), 0], atol=0)


@pytest.mark.parametrize("dp", [False, True])
def test_final_fit_refits_the_personal_part_alone_keeps_it_and_accounts_it(tmp_path: Path, dp: bool) -> None:
    """personalization.final-fit: the bias refitted to the final shared weight; under DP, accounted."""
    import numpy as np

    from client.node import run_evaluate
    from client.state import StateStore

    over = {**HEAD_ONLY, "dp.enabled": dp, "dp.epsilon": 8.0}
    cfg = Config.from_run_config({**over, "personalization.final-fit": 5})
    template = get_task(cfg).backbone().template
    shared = get_arrays(template, ["head.weight"])
    node = NodeInfo(0, 4, tmp_path, run_id=1)
    out, _ = run_train(cfg, node, shared, 1)
    before = StateStore(tmp_path).load()
    assert before is not None
    history = list(before.history)
    plain = run_evaluate(Config.from_run_config(over), node, out, final_round=True)  # no fit: unchanged
    assert np.array_equal(StateStore(tmp_path).load().tensors["head.bias"], before.tensors["head.bias"])
    metrics = run_evaluate(cfg, node, out, final_round=True)
    after = StateStore(tmp_path).load()
    assert not np.array_equal(after.tensors["head.bias"], before.tensors["head.bias"])  # refitted and kept
    assert set(after.tensors) == {"head.bias"}  # the shared weight is never kept as personal
    assert np.array_equal(after.shared["head.weight"], out["head.weight"])  # evaluated on the final shared
    assert 0 <= metrics["eval-acc"] <= 1 and 0 <= plain["eval-acc"] <= 1
    if dp:  # the fit's steps are composed into the device's accountant and reported
        total = sum(e[2] for e in after.history)
        assert metrics["steps"] > 0 and total == sum(e[2] for e in history) + metrics["steps"]
        assert 0 < metrics["epsilon"] <= 8.0
    else:
        assert after.history == history


def test_final_fit_needs_a_personal_part() -> None:
    for mode in ("fedavg", "fedavg-ft"):
        with pytest.raises(ConfigError, match="final-fit = 3 has no effect in mode"):
            Config.from_run_config(
                {**HEAD_ONLY, "personalization.mode": mode, "personalization.final-fit": 3}
            )


@pytest.mark.parametrize(
    ("mode", "sent"),
    [
        ("fedper", {"proj.weight", "proj.bias"}),
        ("fedbias", {"proj.weight", "proj.bias", "head.weight"}),
        ("local", set()),
    ],
)
def test_a_shared_projection_is_the_body_a_personal_head_sits_on(
    tmp_path: Path, mode: str, sent: set[str]
) -> None:
    """shared-projection = k: proj (hidden → k) is shared like LoRA, the k × classes head sits on it."""
    cfg = Config.from_run_config(
        {**HEAD_ONLY, "personalization.mode": mode, "personalization.shared-projection": 3}
    )
    backbone = get_task(cfg).backbone()
    model = backbone.new_model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    hidden = backbone.prefix.config.hidden_size
    assert shapes["proj.weight"] == (3, hidden) and shapes["head.weight"][1] == 3
    names = split_names(list(shapes), mode)
    assert set(names["shared"]) == sent and set(names["personal"]) == set(shapes) - sent
    out, _ = run_train(cfg, NodeInfo(0, 4, tmp_path, run_id=1), get_arrays(model, names["shared"]), 1)
    assert set(out) == sent
    plain = Config.from_run_config({**HEAD_ONLY, "personalization.mode": "fedbias"})
    assert get_task(plain).backbone().fingerprint != backbone.fingerprint  # a state of one is not the other's


def test_a_shared_projection_needs_a_head_only_classifier() -> None:
    with pytest.raises(ConfigError, match="needs lora.r = 0"):
        Config.from_run_config({**TINY_TRAIN, "personalization.shared-projection": 4})
    with pytest.raises(ConfigError, match="fedper with personalization.shared-projection"):
        Config.from_run_config({**HEAD_ONLY, "personalization.mode": "fedper"})


def test_pooled_rows_are_shared_by_models_over_the_same_frozen_encoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row cache keys on the prefix's weights: another head reads the rows, another init does not."""
    import numpy as np

    import common.features as F

    texts, labels = ["one more time", "not again", "all good"], np.array([0, 1, 2])
    seen: list[int] = []
    real = F.run_prefix
    monkeypatch.setattr(
        F, "run_prefix", lambda b, ids, *a, **k: seen.append(len(ids)) or real(b, ids, *a, **k)
    )
    F._ROWS.clear()
    for extra in ({}, {"personalization.shared-projection": 2}, {"model.seed": 7}):
        cfg = Config.from_run_config({**HEAD_ONLY, **extra})
        F.encode(get_task(cfg).backbone(), texts, labels, cfg.task.max_length, pooled=True)
    assert seen == [3, 3]  # the projection model reused the rows; tiny's seed re-draws its encoder: not
