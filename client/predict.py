"""Use the personalized model on the device: the latest shared adapters plus this user's personal part.

Everything comes from the client's encrypted state (written after every evaluation): the configuration,
the latest global tensors and the personal tensors. Offline: the frozen encoder is the cached asset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.state import PersonalState, StateStore
from client.state_dir import check_state_dir
from common.config import Config
from common.device import place, resolve_device
from common.errors import StateError
from common.params import set_arrays
from common.split import split_names
from common.tasks import get_task
from common.tasks.base import check_command


def load_personal_model(
    state_dir: str | Path, key_file: str | Path | None = None, *, command: str
) -> tuple[Config, Any, Any]:
    """(config, backbone, personalized model in eval mode) rebuilt from a client's encrypted state.

    ``command`` is the `fedpers` command that will use it (``predict``, ``chat``, ``generate``); a state
    whose task that command cannot use, or one without a model yet, is a clear error.
    """
    cfg, backbone, model, _ = load_personal(state_dir, key_file, command=command)
    return cfg, backbone, model


def load_personal(
    state_dir: str | Path, key_file: str | Path | None = None, *, command: str, device: str = "cpu"
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
    task = get_task(cfg)
    check_command(task, command, cfg.model.name, state_dir)
    backbone = task.backbone()
    place(backbone, resolve_device(device))
    model = backbone.new_model().eval()
    roles = split_names([n for n, _ in model.named_parameters()], cfg.personalization.mode)
    set_arrays(model, state.shared, roles["shared"])
    set_arrays(model, state.tensors, roles["personal"])
    return cfg, backbone, model, state


def predict(state_dir: str | Path, texts: Sequence[str], key_file: str | Path | None = None) -> list[Any]:
    """Run the model this client's state describes on ``texts``: a label each, or their tagged entities.

    The results have ``columns`` and ``row()`` for a table (common.tasks: ``Prediction``, ``Tagged``).
    """
    if not texts:
        raise ValueError("give at least one text to classify or tag")
    cfg, backbone, model = load_personal_model(state_dir, key_file, command="predict")
    return get_task(cfg).predict(backbone, model, texts)
