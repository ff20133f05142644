"""The edge-GPU path on a real CUDA device: DP-SGD, the bf16 frozen prefix, a federation and the state.

Skipped where torch sees no CUDA GPU (CI has none). On a GPU box run ``pytest tests/test_gpu.py``; the rest
of the suite then also trains on the GPU wherever a node uses ``device = "auto"``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN
from test_dp_training import _check_changed_and_frozen, _model, _reference_per_sample, _snapshot, _trainable

from client.state import StateStore
from client.training import DPPlan, sample_rate, train
from common.config import Config
from common.data import load_client_data
from common.device import describe, resolve_device
from common.features import Features, encode
from common.privacy import epsilon
from common.tasks import Backbone, get_backbone
from simulations.sequential import run_sequential

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _cfg(**over: object) -> Config:
    return Config.from_run_config({**TINY_TRAIN, **over})


@pytest.fixture(scope="module")
def setup() -> tuple[Backbone, Features, Features]:
    """The tiny backbone, its features computed on the CPU (float32) and on CUDA (bf16 prefix)."""
    cfg = _cfg()
    backbone = get_backbone(cfg)
    data = load_client_data(cfg.task, 0, 4)
    on_cpu = encode(backbone, data.train_texts, data.train_labels, cfg.task.max_length)
    on_gpu = encode(backbone, data.train_texts, data.train_labels, cfg.task.max_length, device=CUDA)
    return backbone, on_cpu, on_gpu


def test_auto_picks_the_gpu_and_names_it() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert describe(device).startswith("cuda:0 (")


def test_the_bf16_prefix_output_is_float32_and_close_to_the_cpu_one(setup) -> None:
    _, on_cpu, on_gpu = setup
    assert on_gpu.hidden.dtype == torch.float32  # the trainable part never sees bf16
    assert torch.equal(on_gpu.mask, on_cpu.mask) and torch.equal(on_gpu.labels, on_cpu.labels)
    err = (on_gpu.hidden - on_cpu.hidden).abs().max() / on_cpu.hidden.abs().max()
    bf16 = torch.cuda.is_bf16_supported()
    assert float(err) < (0.05 if bf16 else 1e-4), f"relative error {float(err):.2e} (bf16 prefix: {bf16})"
    assert not torch.equal(on_gpu.hidden, on_cpu.hidden) or not bf16  # bf16 really ran


@pytest.mark.parametrize("gsm_mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("physical", [0, 5])
def test_one_dp_step_on_the_gpu_is_the_clipped_mean_of_per_example_gradients(
    setup, gsm_mode: str, physical: int
) -> None:
    """Opacus on CUDA clips each example's whole gradient to C and averages, sliced or not (σ = 0, q = 1)."""
    if physical and gsm_mode == "ghost":
        pytest.skip("a physical batch cap needs hooks or functorch")
    backbone, on_cpu, _ = setup
    n, clip = 12, 0.05
    cfg = _cfg(**{"train.batch-size": n, "dp.grad-sample-mode": gsm_mode, "dp.max-grad-norm": clip})
    feats = Features(on_cpu.hidden[:n], on_cpu.mask[:n], on_cpu.labels[:n])
    ref = _reference_per_sample(_model(backbone).cpu(), *feats.batch(slice(0, n)))  # float32 autograd, CPU
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).all(), "clipping must be active"
    model = _model(backbone).to(CUDA)
    before = {k: p.detach().cpu().clone() for k, p in model.named_parameters()}
    out = train(model, feats.to(CUDA), cfg, epochs=1, plan=DPPlan(0.0, 1.0, 1e-3), history=[], seed=0,
                physical_batch=physical)  # fmt: skip
    assert out.steps == 1
    for name, p in _trainable(model).items():
        assert p.device.type == CUDA.type and p.dtype == torch.float32
        lr = cfg.train.lr_head if name.startswith("head.") else cfg.train.lr_lora
        mean = (ref[name] * factor.view(-1, *[1] * (ref[name].dim() - 1))).sum(0) / n
        torch.testing.assert_close(p.detach().cpu(), before[name] - lr * mean, rtol=1e-3, atol=1e-6)


def test_dp_training_on_the_gpu_moves_every_trainable_tensor_and_no_frozen_one(setup) -> None:
    backbone, _, on_gpu = setup
    cfg = _cfg()
    model = _model(backbone).to(CUDA)
    before = _snapshot(model, backbone)
    q = sample_rate(len(on_gpu), cfg.train.batch_size)
    out = train(model, on_gpu.to(CUDA), cfg, epochs=2, plan=DPPlan(1.0, q, 1e-3), history=[], seed=1)
    assert math.isfinite(out.loss)
    _check_changed_and_frozen(before, model, backbone)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    # The accountant composes the same mechanism as on the CPU: ε does not depend on the device.
    cpu = train(
        _model(backbone).cpu(),
        on_gpu.to(torch.device("cpu")),
        cfg,
        epochs=2,
        plan=DPPlan(1.0, q, 1e-3),
        history=[],
        seed=1,
    )
    assert out.history == cpu.history and out.steps == cpu.steps
    assert epsilon(out.history, 1e-3, "prv") == epsilon(cpu.history, 1e-3, "prv")


@pytest.mark.parametrize("mode", ["fedper", "fedavg-ft"])
def test_a_sequential_federation_trains_on_the_gpu_and_its_state_loads_anywhere(
    tmp_path: Path, mode: str
) -> None:
    over = {**TINY_TRAIN, "fed.num-rounds": 2, "personalization.mode": mode}
    torch.cuda.reset_peak_memory_stats()
    out = run_sequential(over, 2, tmp_path)
    assert torch.cuda.max_memory_allocated() > 0  # the clients trained on the GPU ("auto")
    assert 0.0 <= out["acc-p10"] <= out["acc-mean"] <= 1.0 and 0 < out["epsilon-max"] <= 8.0
    for i in range(2):
        state = StateStore(tmp_path / "clients" / f"client-{i:04d}").load()
        assert state is not None and state.rounds_trained == 2
        if mode == "fedper":
            assert sorted(state.tensors) == ["head.bias", "head.weight"]
        assert all(isinstance(t, np.ndarray) and np.isfinite(t).all() for t in state.tensors.values())
        assert epsilon(state.history, float(state.run_plan["delta"]), "prv") <= 8.0 + 1e-9
