"""``head_view``: a head-only personal refit runs the frozen top layers once, and fits the same head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from client.node import NodeInfo, run_evaluate, run_train
from client.state import StateStore
from client.training import steps_per_epoch, train
from common.config import Config
from common.model import head_view
from common.params import get_arrays
from common.split import split_names
from common.tasks import get_task

LORA = {**TINY_TRAIN, "personalization.mode": "fedper"}  # LoRA on the top layer, a personal head


def _model_and_feats(over: dict[str, object]):  # type: ignore[no-untyped-def]
    cfg = Config.from_run_config(over)
    task = get_task(cfg)
    backbone = task.backbone()
    model = backbone.new_model()
    for name, param in model.named_parameters():  # LoRA B starts at zero: give the body some effect
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return cfg, model, task.features(backbone, task.load(0, 4), "train")


def test_the_view_computes_what_the_model_does_and_trains_its_head_in_place() -> None:
    cfg, model, feats = _model_and_feats(LORA)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
    view = head_view(model, feats)
    assert view is not None
    head, inputs = view
    assert head.head is model.head and len(inputs) == len(feats)
    model.eval()
    with torch.no_grad():
        want = model(feats.hidden, feats.mask)
        got = head(*inputs.batch(slice(None))[:2])
    assert torch.allclose(got, want, atol=1e-5)
    body = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("head.")}
    before = model.head.weight.detach().clone()
    train(head, inputs, cfg, epochs=2, plan=None, history=[], seed=0)
    assert not torch.equal(model.head.weight, before)  # the model's own head moved
    assert all(torch.equal(p, body[n]) for n, p in model.named_parameters() if n in body)


def test_no_view_when_anything_but_the_head_trains() -> None:
    _, model, feats = _model_and_feats(LORA)
    assert head_view(model, feats) is None  # LoRA trains too
    for param in model.parameters():
        param.requires_grad_(False)
    assert head_view(model, feats) is None  # nothing trains


def test_without_top_layers_the_view_fits_exactly_the_head_the_model_would() -> None:
    """lora.r = 0 (no dropout anywhere): the same seed gives the same tensors through either path."""
    over = {
        **TINY_TRAIN,
        "lora.r": 0,
        "model.frozen-layers": 4,
        "personalization.mode": "fedper",
        "personalization.shared-projection": 3,  # a frozen shared projection under the personal head
    }
    cfg, model, feats = _model_and_feats(over)
    slow = get_task(cfg).backbone().new_model()
    slow.load_state_dict(model.state_dict())
    for net in (model, slow):
        for name, param in net.named_parameters():
            param.requires_grad_(name.startswith("head."))
    view = head_view(model, feats)
    assert view is not None
    train(view[0], view[1], cfg, epochs=3, plan=None, history=[], seed=7)
    train(slow, feats, cfg, epochs=3, plan=None, history=[], seed=7)
    for name, param in slow.named_parameters():
        assert torch.allclose(param, dict(model.named_parameters())[name], atol=1e-5), name


@pytest.mark.parametrize("dp", [False, True])
def test_the_final_refit_of_a_lora_model_moves_only_the_head_and_accounts_every_step(
    tmp_path: Path, dp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.node

    views: list[object] = []
    monkeypatch.setattr(client.node, "head_view", lambda m, f: views.append(head_view(m, f)) or views[-1])
    over = {**LORA, "dp.enabled": dp, "dp.epsilon": 8.0}
    cfg = Config.from_run_config({**over, "personalization.final-fit": 3})
    template = get_task(cfg).backbone().template
    names = split_names([n for n, _ in template.named_parameters()], "fedper")
    node = NodeInfo(0, 4, tmp_path, run_id=1)
    out, _ = run_train(cfg, node, get_arrays(template, names["shared"]), 1)
    before = StateStore(tmp_path).load()
    assert before is not None
    history = list(before.history)
    metrics = run_evaluate(cfg, node, out, final_round=True)
    after = StateStore(tmp_path).load()
    assert len(views) == 1 and views[0] is not None  # the refit took the head-only path
    assert set(after.tensors) == set(names["personal"]) == {"head.weight", "head.bias"}
    assert all(not np.array_equal(after.tensors[n], before.tensors[n]) for n in after.tensors)
    assert all(np.array_equal(after.shared[n], out[n]) for n in names["shared"])  # evaluated on these
    if dp:
        spe = steps_per_epoch(len(get_task(cfg).load(0, 4).train_texts), cfg.train.batch_size)
        assert metrics["steps"] == 3 * spe
        assert sum(e[2] for e in after.history) == sum(e[2] for e in history) + 3 * spe
    else:
        assert after.history == history
