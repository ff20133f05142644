"""The Opacus + PEFT guard (cf. opacus issue #820: silently wrong LoRA updates).

On the real tiny model and real tweets: every trainable tensor gets a correct per-sample gradient,
DP training moves every LoRA tensor and the head and leaves every frozen tensor bit-identical, and the
accountant history returned by ``train`` is exactly what was run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN
from opacus import GradSampleModule, PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.training import DPPlan, sample_rate, steps_per_epoch, train
from common.config import Config
from common.data import load_client_data
from common.errors import DataError
from common.features import Features, encode
from common.model import PersonalModel
from common.tasks import Backbone, get_backbone

BASE = dict(TINY_TRAIN)


def _cfg(**over: object) -> Config:
    return Config.from_run_config({**BASE, **over})


@pytest.fixture(scope="module")
def setup() -> tuple[Config, Backbone, Features]:
    cfg = _cfg()
    backbone = get_backbone(cfg)
    data = load_client_data(cfg.task, 0, 4)
    feats = encode(backbone, data.train_texts, data.train_labels, cfg.task.max_length)
    assert len(feats) == 60
    return cfg, backbone, feats


def _model(backbone: Backbone, seed: int = 0) -> PersonalModel:
    """A fresh model with LoRA B non-zero, so LoRA A has a gradient too."""
    model = backbone.new_model()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _frozen(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def test_model_has_the_expected_trainable_tensors(setup: tuple[Config, Backbone, Features]) -> None:
    _, backbone, _ = setup
    names = set(_trainable(backbone.new_model()))
    assert {"head.weight", "head.bias"} <= names
    assert sum(".lora_A." in n for n in names) == 2 and sum(".lora_B." in n for n in names) == 2
    assert len(names) == 6
    assert all(not p.requires_grad for p in backbone.prefix.parameters())


def _reference_per_sample(model: PersonalModel, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-example gradients by plain autograd, one example at a time."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in _trainable(model)}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(h[i : i + 1], m[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for n, p in _trainable(model).items():
            out[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in out.items()}


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_match_autograd_loop(
    setup: tuple[Config, Backbone, Features], mode: str
) -> None:
    _, backbone, feats = setup
    h, m, y = feats.batch(torch.arange(6))
    ref = _reference_per_sample(_model(backbone), h, m, y)
    model = _model(backbone)
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="sum", force_functorch=(mode == "functorch")
    )
    try:
        F.cross_entropy(gsm(h, m), y, reduction="sum").backward()
        for name, p in _trainable(model).items():
            gs = p.grad_sample
            assert gs is not None, f"{name} has no per-sample gradient"
            assert tuple(gs.shape) == (6, *p.shape), name
            assert ref[name].abs().max() > 0, f"reference gradient of {name} is zero: test would be vacuous"
            torch.testing.assert_close(gs, ref[name], rtol=1e-4, atol=1e-7, msg=lambda s, n=name: f"{n}: {s}")
            # The summed gradient equals the sum of the per-sample ones.
            torch.testing.assert_close(p.grad, ref[name].sum(0), rtol=1e-4, atol=1e-7)
        for name, p in _frozen(model).items():
            assert p.grad is None, name
            assert getattr(p, "grad_sample", None) is None, name
    finally:
        gsm._close()


def test_make_private_hooks_gives_every_trainable_tensor_a_grad_sample(
    setup: tuple[Config, Backbone, Features],
) -> None:
    cfg, backbone, feats = setup
    model = _model(backbone)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(TensorDataset(torch.arange(len(feats))), batch_size=cfg.train.batch_size)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        grad_sample_mode="hooks",
        loss_reduction="sum",
    )
    try:
        assert dp_model._module is model
        h, m, y = feats.batch(torch.arange(8))
        dp_opt.zero_grad(set_to_none=True)
        F.cross_entropy(dp_model(h, m), y, reduction="sum").backward()
        trainable = _trainable(model)
        assert len(trainable) == 6
        for name, p in trainable.items():
            assert p.grad_sample is not None, name
            assert p.grad_sample.shape == (8, *p.shape), name
            assert p.grad_sample.abs().sum() > 0, name
        for name, p in _frozen(model).items():
            assert p.grad is None and getattr(p, "grad_sample", None) is None, name
        # Every trainable tensor is in the DP optimizer (clipped and noised), none left out.
        in_opt = {id(p) for g in dp_opt.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in trainable.values()}
    finally:
        dp_model._close()


def _snapshot(model: torch.nn.Module, backbone: Backbone) -> dict[str, torch.Tensor]:
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    snap.update({f"prefix.{n}": p.detach().clone() for n, p in backbone.prefix.state_dict().items()})
    return snap


def _check_changed_and_frozen(
    before: dict[str, torch.Tensor], model: torch.nn.Module, backbone: Backbone
) -> None:
    after = {n: p.detach() for n, p in model.named_parameters()}
    after.update({f"prefix.{n}": p for n, p in backbone.prefix.state_dict().items()})
    assert set(after) == set(before)
    trainable = set(_trainable(model))
    assert len(trainable) == 6
    base_in_top = [n for n in after if n.startswith("body.") and n not in trainable]
    assert any("query.base_layer.weight" in n for n in base_in_top)
    for name, value in after.items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"trainable {name} did not change"
            assert torch.isfinite(value).all(), name
        else:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    assert any(n.startswith("prefix.") for n in after)


@pytest.mark.parametrize(
    ("gsm_mode", "lora_b_zero"), [("hooks", True), ("hooks", False), ("functorch", False), ("ghost", False)]
)
def test_dp_train_changes_lora_and_head_only(
    setup: tuple[Config, Backbone, Features], gsm_mode: str, lora_b_zero: bool
) -> None:
    _, backbone, feats = setup
    cfg = _cfg(**{"dp.grad-sample-mode": gsm_mode})
    model = backbone.new_model() if lora_b_zero else _model(backbone)
    before = _snapshot(model, backbone)
    q = sample_rate(len(feats), cfg.train.batch_size)
    out = train(model, feats, cfg, epochs=1, plan=DPPlan(1.0, q, 1e-3), history=[], seed=1)
    assert math.isfinite(out.loss)
    _check_changed_and_frozen(before, model, backbone)
    # No Opacus leftovers on the returned plain module.
    assert not hasattr(model, "_module")
    for p in model.parameters():
        assert getattr(p, "grad_sample", None) is None


def test_dp_train_with_lora_a_frozen_keeps_it(setup: tuple[Config, Backbone, Features]) -> None:
    """ffa-style: LoRA A frozen, so Opacus must leave it untouched while B and the head learn."""
    cfg, backbone, feats = setup
    model = _model(backbone)
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = sample_rate(len(feats), cfg.train.batch_size)
    train(model, feats, cfg, epochs=1, plan=DPPlan(1.0, q, 1e-3), history=[], seed=2)
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (".lora_B." in n or n.startswith("head.")), n


@pytest.mark.parametrize(("n", "epochs", "physical"), [(60, 2, 0), (50, 1, 0), (60, 2, 4)])
def test_dp_history_and_steps(
    setup: tuple[Config, Backbone, Features], n: int, epochs: int, physical: int
) -> None:
    """Steps and accountant history; a physical batch cap (4) changes neither (slices are not steps)."""
    cfg, backbone, full = setup
    feats = Features(full.hidden[:n], full.mask[:n], full.labels[:n])
    q = sample_rate(n, cfg.train.batch_size)
    assert q == 1 / math.ceil(n / 20)
    sigma = 0.9
    plan = DPPlan(sigma, q, 1e-3)
    model = backbone.new_model()
    out = train(model, feats, cfg, epochs=epochs, plan=plan, history=[], seed=3, physical_batch=physical)
    steps = epochs * math.ceil(n / cfg.train.batch_size)
    assert out.steps == steps == epochs * steps_per_epoch(n, cfg.train.batch_size)
    assert out.history == [(sigma, q, steps)]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_dp_history_merges_with_persisted_history(
    setup: tuple[Config, Backbone, Features], accountant: str
) -> None:
    _, backbone, full = setup
    cfg = _cfg(**{"dp.accountant": accountant})
    n = 40
    feats = Features(full.hidden[:n], full.mask[:n], full.labels[:n])
    q, sigma, steps = sample_rate(n, cfg.train.batch_size), 0.9, 2
    # The same (sigma, q) continues the last entry.
    out = train(
        backbone.new_model(),
        feats,
        cfg,
        epochs=1,
        plan=DPPlan(sigma, q, 1e-3),
        history=[(sigma, q, 7)],
        seed=4,
    )
    assert out.steps == steps
    assert out.history == [(sigma, q, 7 + steps)]
    # Another sigma starts a new entry after the old ones (which are kept as they were).
    old = [(2.0, 0.25, 4), (sigma, q, 7)]
    out2 = train(backbone.new_model(), feats, cfg, epochs=1, plan=DPPlan(1.3, q, 1e-3), history=old, seed=5)
    assert out2.history == [*old, (1.3, q, steps)]
    assert old == [(2.0, 0.25, 4), (sigma, q, 7)]  # the input list is not mutated


@pytest.mark.parametrize("gsm_mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("clip", [1e6, 0.05], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("physical", [0, 5])
def test_dp_step_equals_clipped_mean_of_true_per_sample_gradients(
    setup: tuple[Config, Backbone, Features], gsm_mode: str, clip: float, physical: int
) -> None:
    """One full-batch DP step (q = 1, sigma = 0) moves each tensor by lr * mean_i(clip_i * g_i).

    ``clip_i`` uses the norm of example i's gradient over ALL trainable tensors together, as DP-SGD
    requires; the reference gradients come from plain autograd, one example at a time. With a
    physical batch cap (5 of 12: slices of 5, 5, 2) the one step must be exactly the same.
    """
    if physical and gsm_mode == "ghost":
        pytest.skip("a physical batch cap needs hooks or functorch")
    _, backbone, full = setup
    n = 12
    cfg = _cfg(**{"train.batch-size": n, "dp.grad-sample-mode": gsm_mode, "dp.max-grad-norm": clip})
    feats = Features(full.hidden[:n], full.mask[:n], full.labels[:n])
    h, m, y = feats.batch(slice(0, n))
    ref = _reference_per_sample(_model(backbone), h, m, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    if clip < 1:
        assert (factor < 1).all(), "clipping must be active in the clipped case"
    model = _model(backbone)
    before = {n_: p.detach().clone() for n_, p in model.named_parameters()}
    plan = DPPlan(0.0, 1.0, 1e-3)
    out = train(model, feats, cfg, epochs=1, plan=plan, history=[], seed=0, physical_batch=physical)
    assert out.steps == 1
    for name, p in _trainable(model).items():
        lr = cfg.train.lr_head if name.startswith("head.") else cfg.train.lr_lora
        mean = (ref[name] * factor.view(-1, *[1] * (ref[name].dim() - 1))).sum(0) / n
        expected = before[name] - lr * mean
        assert not torch.equal(expected, before[name]), name
        torch.testing.assert_close(
            p.detach(), expected, rtol=1e-4, atol=1e-7, msg=lambda s, n_=name: f"{n_}: {s}"
        )


@pytest.mark.parametrize("gsm_mode", ["hooks", "functorch"])
def test_per_tensor_clipping_clips_each_tensor_to_its_share(
    setup: tuple[Config, Backbone, Features], gsm_mode: str
) -> None:
    """dp.clipping = per-tensor: each tensor of each example is clipped to C/sqrt(k) on its own."""
    _, backbone, full = setup
    n, clip = 12, 0.05
    cfg = _cfg(
        **{
            "train.batch-size": n,
            "dp.grad-sample-mode": gsm_mode,
            "dp.max-grad-norm": clip,
            "dp.clipping": "per-tensor",
        }
    )
    feats = Features(full.hidden[:n], full.mask[:n], full.labels[:n])
    h, m, y = feats.batch(slice(0, n))
    ref = _reference_per_sample(_model(backbone), h, m, y)
    share = clip / math.sqrt(len(ref))
    model = _model(backbone)
    before = {n_: p.detach().clone() for n_, p in model.named_parameters()}
    train(model, feats, cfg, epochs=1, plan=DPPlan(0.0, 1.0, 1e-3), history=[], seed=0)
    for name, p in _trainable(model).items():
        g = ref[name]
        norms = g.flatten(1).norm(dim=1)
        factor = (share / (norms + 1e-6)).clamp(max=1.0)
        lr = cfg.train.lr_head if name.startswith("head.") else cfg.train.lr_lora
        expected = before[name] - lr * (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / n
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-7)


def test_dp_rejects_a_plan_with_another_sample_rate(setup: tuple[Config, Backbone, Features]) -> None:
    cfg, backbone, feats = setup
    model = backbone.new_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(DataError, match="sample rate"):
        train(model, feats, cfg, epochs=1, plan=DPPlan(1.0, 0.5, 1e-3), history=[], seed=0)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_dp_noise_is_not_replayable_from_the_seed(setup: tuple[Config, Backbone, Features]) -> None:
    """Anyone knowing the configured seed must not be able to replay DP sampling and noise."""
    cfg, backbone, full = setup
    feats = Features(full.hidden[:40], full.mask[:40], full.labels[:40])
    q = sample_rate(len(feats), cfg.train.batch_size)
    a, b = backbone.new_model(), backbone.new_model()
    train(a, feats, cfg, epochs=1, plan=DPPlan(1.0, q, 1e-3), history=[], seed=11)
    train(b, feats, cfg, epochs=1, plan=DPPlan(1.0, q, 1e-3), history=[], seed=11)
    assert not torch.equal(a.head.weight, b.head.weight)


def test_plain_train_is_reproducible_with_seed(setup: tuple[Config, Backbone, Features]) -> None:
    _, backbone, full = setup
    cfg = _cfg(**{"dp.enabled": False})
    feats = Features(full.hidden[:40], full.mask[:40], full.labels[:40])
    a, b = backbone.new_model(), backbone.new_model()
    train(a, feats, cfg, epochs=1, plan=None, history=[], seed=11)
    train(b, feats, cfg, epochs=1, plan=None, history=[], seed=11)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_plain_train_changes_lora_and_head_only(setup: tuple[Config, Backbone, Features]) -> None:
    _, backbone, feats = setup
    cfg = _cfg(**{"dp.enabled": False})
    model = _model(backbone)
    before = _snapshot(model, backbone)
    history = [(1.0, 0.5, 3)]
    out = train(model, feats, cfg, epochs=1, plan=None, history=history, seed=1)
    assert out.steps == math.ceil(len(feats) / cfg.train.batch_size)
    assert out.history == history  # no DP: the privacy history is unchanged
    assert math.isfinite(out.loss)
    _check_changed_and_frozen(before, model, backbone)


def test_train_needs_two_examples(setup: tuple[Config, Backbone, Features]) -> None:
    cfg, backbone, full = setup
    one = Features(full.hidden[:1], full.mask[:1], full.labels[:1])
    with pytest.raises(DataError, match="at least 2"):
        train(backbone.new_model(), one, cfg, epochs=1, plan=None, history=[], seed=0)


def test_dp_train_survives_empty_poisson_batches(setup: tuple[Config, Backbone, Features]) -> None:
    """With 4 examples and an expected batch of 1 (q = 1/4), ~32 % of the 40 Poisson batches are empty."""
    _, backbone, full = setup
    cfg = _cfg(**{"train.batch-size": 1})
    feats = Features(full.hidden[:4], full.mask[:4], full.labels[:4])
    q = sample_rate(4, 1)
    assert q == 0.25
    out = train(backbone.new_model(), feats, cfg, epochs=10, plan=DPPlan(1.0, q, 1e-3), history=[], seed=0)
    assert out.steps == 40
    assert out.history == [(1.0, q, 40)]
