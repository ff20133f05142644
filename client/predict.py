"""Use the personalized model on the device: the latest shared adapters plus this user's personal part.

Everything comes from the client's encrypted state (written after every evaluation): the configuration,
the latest global tensors and the personal tensors. Offline: the frozen encoder is the cached asset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.state import PersonalState, StateStore
from client.state_dir import check_state_dir
from common.config import Config, is_causal
from common.data import label_names
from common.device import place, resolve_device
from common.errors import ConfigError, StateError
from common.features import prefix_features
from common.model import get_backbone
from common.params import set_arrays
from common.split import split_names


@dataclass(frozen=True)
class Prediction:
    """One text's predicted label and the probability of every label."""

    text: str
    label: str
    probabilities: dict[str, float]


def load_personal_model(
    state_dir: str | Path, key_file: str | Path | None = None, *, causal: bool
) -> tuple[Config, Any, Any]:
    """(config, backbone, personalized model in eval mode) rebuilt from a client's encrypted state.

    ``causal`` says which kind the caller can use (``predict``: a classifier, ``chat``: a causal LM);
    a state of the other kind, or one without a model yet, is a clear error.
    """
    cfg, backbone, model, _ = load_personal(state_dir, key_file, causal=causal)
    return cfg, backbone, model


def load_personal(
    state_dir: str | Path, key_file: str | Path | None = None, *, causal: bool, device: str = "cpu"
) -> tuple[Config, Any, Any, PersonalState]:
    """As :func:`load_personal_model`, plus the decrypted state it was built from (one read).

    The backbone and the model are placed on ``device`` (cpu | auto | cuda[:N] | mps).
    """
    check_state_dir(state_dir)  # a run, mode or clients folder, a file, nothing: says which
    state = StateStore(state_dir, key_file).load(reading=True)
    if state is None or "config" not in state.meta or not state.shared and not state.tensors:
        raise StateError(
            f"the state in {state_dir} holds no model yet (written after the client's first evaluation)"
        )
    cfg = Config.from_run_config(state.meta["config"])
    if is_causal(cfg) != causal:
        use = "`fedpers chat` or `fedpers generate`" if is_causal(cfg) else "`fedpers predict`"
        raise ConfigError(f"{state_dir} holds a {cfg.model.name} model: use {use}")
    backbone = get_backbone(cfg, len(label_names(cfg.task)))
    place(backbone, resolve_device(device))
    model = backbone.new_model().eval()
    roles = split_names([n for n, _ in model.named_parameters()], cfg.personalization.mode)
    set_arrays(model, state.shared, roles["shared"])
    set_arrays(model, state.tensors, roles["personal"])
    return cfg, backbone, model, state


def predict(
    state_dir: str | Path, texts: Sequence[str], key_file: str | Path | None = None
) -> list[Prediction]:
    """Classify ``texts`` with the model this client's state describes."""
    if not texts:
        raise ValueError("give at least one text to classify")
    cfg, backbone, model = load_personal_model(state_dir, key_file, causal=False)
    names = label_names(cfg.task)
    hidden, mask, order = prefix_features(backbone, list(texts), cfg.task.max_length)
    with torch.no_grad():
        probs = torch.cat(
            [
                torch.softmax(model(hidden[i : i + 128], mask[i : i + 128]), dim=-1)
                for i in range(0, len(texts), 128)
            ]
        ).numpy()
    out: list[Prediction | None] = [None] * len(texts)
    for row, idx in enumerate(order):  # rows are sorted by length; map them back to the inputs
        p = probs[row]
        label = names[int(p.argmax())]
        out[int(idx)] = Prediction(
            texts[int(idx)], label, {n: float(v) for n, v in zip(names, p, strict=True)}
        )
    return [p for p in out if p is not None]
