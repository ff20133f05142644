"""Tests of common.split on the real tiny model's parameter names, for every personalization mode."""

from __future__ import annotations

import pytest

from common.config import MODES, Config
from common.errors import ConfigError
from common.split import param_kind, role_of, split_names
from common.tasks import get_backbone

TINY = {"model.name": "tiny", "model.frozen-layers": 1}


@pytest.fixture(scope="module", params=[1, 0], ids=["frozen1", "frozen0"])
def names(request: pytest.FixtureRequest) -> list[str]:
    cfg = Config.from_run_config({**TINY, "model.frozen-layers": request.param})
    model = get_backbone(cfg).template
    out = [n for n, _ in model.named_parameters()]
    # Sanity of the fixture itself: the model really has every kind of tensor.
    kinds = {param_kind(n) for n in out}
    assert kinds == {"lora_a", "lora_b", "head", "head_bias", "base"}
    return out


def _kind(names: list[str], kind: str) -> set[str]:
    return {n for n in names if param_kind(n) == kind}


def test_param_kind_on_real_names(names: list[str]) -> None:
    assert _kind(names, "head") == {"head.weight"}
    assert _kind(names, "head_bias") == {"head.bias"}
    lora_a = _kind(names, "lora_a")
    lora_b = _kind(names, "lora_b")
    assert lora_a and all(".lora_A.default." in n for n in lora_a)
    assert lora_b and all(".lora_B.default." in n for n in lora_b)
    assert len(lora_a) == len(lora_b)
    base = _kind(names, "base")
    assert any(n.endswith("query.base_layer.weight") for n in base)
    assert any("LayerNorm" in n for n in base)
    assert not any("lora_" in n or n.startswith("head.") for n in base)


def test_lora_sits_on_layers_above_frozen_prefix() -> None:
    cfg0 = Config.from_run_config({**TINY, "model.frozen-layers": 0})
    cfg1 = Config.from_run_config(TINY)
    n0 = [n for n, _ in get_backbone(cfg0).template.named_parameters() if "lora_A" in n]
    n1 = [n for n, _ in get_backbone(cfg1).template.named_parameters() if "lora_A" in n]
    # query and value adapters per LoRA layer: tiny has 2 layers.
    assert len(n0) == 4 and len(n1) == 2


@pytest.mark.parametrize("mode", MODES)
def test_roles_partition_names_and_are_sorted(names: list[str], mode: str) -> None:
    split = split_names(names, mode)
    assert set(split) == {"shared", "personal", "frozen"}
    all_listed = split["shared"] + split["personal"] + split["frozen"]
    assert len(all_listed) == len(set(all_listed)), "a name has two roles"
    assert set(all_listed) == set(names)
    assert len(all_listed) == len(names)
    for role, lst in split.items():
        assert lst == sorted(lst), role
        for n in lst:
            assert role_of(n, mode) == role


@pytest.mark.parametrize("mode", MODES)
def test_backbone_always_frozen(names: list[str], mode: str) -> None:
    split = split_names(names, mode)
    assert _kind(names, "base") <= set(split["frozen"])


@pytest.mark.parametrize(
    ("mode", "head_role"),
    [
        ("fedper", "personal"),
        ("fedsa", "personal"),
        ("ffa", "personal"),
        ("local", "personal"),
        ("fedavg", "shared"),
        ("fedavg-ft", "shared"),
    ],
)
def test_head_role(names: list[str], mode: str, head_role: str) -> None:
    split = split_names(names, mode)
    assert {"head.weight", "head.bias"} <= set(split[head_role])


def test_fedbias_shares_head_weights_keeps_bias_personal(names: list[str]) -> None:
    split = split_names(names, "fedbias")
    assert "head.weight" in split["shared"] and "head.bias" in split["personal"]
    assert split["personal"] == ["head.bias"]


def test_modes_table_is_complete() -> None:
    assert set(MODES) == {"fedper", "local", "fedavg", "fedavg-ft", "fedsa", "ffa", "fedbias"}


EXPECTED = {
    # mode: (shared kinds, personal kinds, frozen kinds)
    "fedper": ({"lora_a", "lora_b"}, {"head", "head_bias"}, {"base"}),
    "local": (set(), {"lora_a", "lora_b", "head", "head_bias"}, {"base"}),
    "fedavg": ({"lora_a", "lora_b", "head", "head_bias"}, set(), {"base"}),
    "fedavg-ft": ({"lora_a", "lora_b", "head", "head_bias"}, set(), {"base"}),
    "fedsa": ({"lora_a"}, {"lora_b", "head", "head_bias"}, {"base"}),
    "ffa": ({"lora_b"}, {"head", "head_bias"}, {"base", "lora_a"}),
    "fedbias": ({"lora_a", "lora_b", "head"}, {"head_bias"}, {"base"}),
}


@pytest.mark.parametrize("mode", MODES)
def test_exact_split_per_mode(names: list[str], mode: str) -> None:
    split = split_names(names, mode)
    for role, kinds in zip(("shared", "personal", "frozen"), EXPECTED[mode], strict=True):
        want = {n for n in names if param_kind(n) in kinds}
        assert set(split[role]) == want, (mode, role)


def test_local_shares_nothing(names: list[str]) -> None:
    assert split_names(names, "local")["shared"] == []


def test_fedsa_shares_only_lora_a(names: list[str]) -> None:
    shared = split_names(names, "fedsa")["shared"]
    assert shared and all(".lora_A." in n for n in shared)


def test_ffa_shares_only_lora_b_and_freezes_lora_a(names: list[str]) -> None:
    split = split_names(names, "ffa")
    assert split["shared"] and all(".lora_B." in n for n in split["shared"])
    assert _kind(names, "lora_a") <= set(split["frozen"])
    assert not any(".lora_A." in n for n in split["personal"])


def test_unknown_mode_raises(names: list[str]) -> None:
    with pytest.raises(ConfigError, match="fedprox"):
        split_names(names, "fedprox")
    with pytest.raises(ConfigError, match="allowed"):
        role_of("head.weight", "nope")


def test_name_rules_are_anchored() -> None:
    # Look-alikes must not be classified as adapters or head.
    assert param_kind("headless.weight") == "base"
    assert param_kind("x.mylora_A.default.weight") == "base"
    assert param_kind("x.lora_Ax.weight") == "base"
    assert param_kind("lora_A.default.weight") == "lora_a"
    assert param_kind("a.b.lora_B.default.weight") == "lora_b"


def test_template_trainability_matches_split() -> None:
    cfg = Config.from_run_config(TINY)
    model = get_backbone(cfg).template
    for n, p in model.named_parameters():
        assert p.requires_grad == (param_kind(n) != "base"), n
