"""The shared / personal / frozen split of trainable parameters, as a rule over parameter names.

Every personalization mode is a configuration of one rule, not a fork of the code:

==========  ===================  ============================  ================
mode        shared (sent)        personal (stays on device)    frozen extra
==========  ===================  ============================  ================
fedper      LoRA A and B         head                          -
local       -                    LoRA A and B, head            -
fedavg      LoRA A and B, head   -                             -
fedavg-ft   LoRA A and B, head   - (fine-tuned copy at eval)   -
fedsa       LoRA A               LoRA B, head                  -
ffa         LoRA B               head                          LoRA A (seeded)
fedbias     LoRA, head weights   head bias (the label prior)   -
==========  ===================  ============================  ================

With ``lora.r = 0`` and ``personalization.shared-projection`` the linear ``proj`` under the head takes
the LoRA tensors' role (shared in every mode that shares, personal in ``local``): ``fedper`` is then a shared
low-dimensional representation with a personal head on it.

``fedbias`` fits label skew: what a label means is common to all users, so the classifier weights are
learned by everyone (their DP noise averages out over clients), and only the per-class bias, which carries
each user's label prior, stays personal.

Backbone weights are always frozen and never leave the model builder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from common.config import MODES
from common.errors import ConfigError

Role = Literal["shared", "personal", "frozen"]

_LORA_A = re.compile(r"(^|\.)lora_A\.")
_LORA_B = re.compile(r"(^|\.)lora_B\.")
_HEAD_BIAS = re.compile(r"^head\.bias$")
_HEAD = re.compile(r"^head\.")
_PROJ = re.compile(r"^proj\.")


def param_kind(name: str) -> Literal["lora_a", "lora_b", "proj", "head", "head_bias", "base"]:
    """Classify a parameter name of a PersonalModel."""
    if _PROJ.search(name):  # the shared projection of a head-only model: the body's role
        return "proj"
    if _HEAD_BIAS.search(name):
        return "head_bias"
    if _HEAD.search(name):  # the personal part; a PEFT-wrapped head (a causal LM's last block) only
        if ".base_model." in name and not (_LORA_A.search(name) or _LORA_B.search(name)):
            return "base"  # the frozen weights of that block
        return "head"
    if _LORA_A.search(name):
        return "lora_a"
    if _LORA_B.search(name):
        return "lora_b"
    return "base"


_RULES: dict[str, dict[str, Role]] = {
    "fedper": {
        "proj": "shared",
        "lora_a": "shared",
        "lora_b": "shared",
        "head": "personal",
        "head_bias": "personal",
    },
    "local": {
        "proj": "personal",
        "lora_a": "personal",
        "lora_b": "personal",
        "head": "personal",
        "head_bias": "personal",
    },
    "fedavg": {
        "proj": "shared",
        "lora_a": "shared",
        "lora_b": "shared",
        "head": "shared",
        "head_bias": "shared",
    },
    "fedavg-ft": {
        "proj": "shared",
        "lora_a": "shared",
        "lora_b": "shared",
        "head": "shared",
        "head_bias": "shared",
    },
    "fedsa": {
        "proj": "shared",
        "lora_a": "shared",
        "lora_b": "personal",
        "head": "personal",
        "head_bias": "personal",
    },
    "ffa": {
        "proj": "shared",
        "lora_a": "frozen",
        "lora_b": "shared",
        "head": "personal",
        "head_bias": "personal",
    },
    "fedbias": {
        "proj": "shared",
        "lora_a": "shared",
        "lora_b": "shared",
        "head": "shared",
        "head_bias": "personal",
    },
}


def shares_nothing(mode: str) -> bool:
    """Whether ``mode`` keeps every kind of tensor personal or frozen (nothing to aggregate)."""
    return "shared" not in _RULES[mode].values()


def role_of(name: str, mode: str) -> Role:
    """The role of one parameter under a personalization mode."""
    if mode not in _RULES:
        raise ConfigError(f"unknown personalization mode {mode!r}; allowed: {', '.join(MODES)}")
    kind = param_kind(name)
    return "frozen" if kind == "base" else _RULES[mode][kind]


def split_names(names: Iterable[str], mode: str) -> dict[Role, list[str]]:
    """Group parameter names by role (each list sorted, so both sides agree on the order)."""
    out: dict[Role, list[str]] = {"shared": [], "personal": [], "frozen": []}
    for name in names:
        out[role_of(name, mode)].append(name)
    for key in out:
        out[key].sort()
    return out
