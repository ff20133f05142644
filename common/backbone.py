"""What every backbone gives a node, whichever task it serves, and the per-process backbone cache.

A backbone is a frozen pretrained network cut in two: ``prefix`` (embeddings and the bottom layers, never
trained, its output cached per example) and ``template`` (the top layers with the shared LoRA adapters and
the personal part, the only module Opacus sees). The encoder backbones are in common.model, the causal LM
in common.causal_model; common.tasks picks one per task.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


class Backbone(Protocol):
    """A frozen prefix, the seeded initial trainable model, and how its targets line up with tokens."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer of the pretrained model."""
        ...

    @property
    def prefix(self) -> nn.Module:
        """The frozen bottom of the network: token ids and a mask in, hidden states out."""
        ...

    @property
    def template(self) -> nn.Module:
        """The seeded initial trainable model (top layers with LoRA and the personal part)."""
        ...

    @property
    def total_params(self) -> int:
        """Parameters of the whole network: frozen, shared and personal."""
        ...

    @property
    def fingerprint(self) -> str:
        """What the models depend on (model, LoRA and output configuration), hashed."""
        ...

    def new_model(self) -> nn.Module:
        """A fresh trainable copy of the seeded initial model."""
        ...

    def targets(
        self,
        ids: Sequence[Sequence[int]],
        unscored: Sequence[int],
        labels: np.ndarray | None,
        order: np.ndarray,
    ) -> torch.Tensor:
        """The training targets of encoded rows in row ``order`` (see common.features.encode)."""
        ...


B = TypeVar("B")
_CACHE: dict[Hashable, object] = {}
_LOCK = threading.Lock()


def cached(key: Hashable, build: Callable[[], B]) -> B:
    """The backbone built by ``build`` for ``key``, once per process (the frozen base is read-only)."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]  # type: ignore[return-value]
