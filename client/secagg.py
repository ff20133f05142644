"""The client's half of SecAgg+ (see server.secagg): Flower's ``secaggplus_mod`` around fedpers' train.

Under SecAgg+ the train instruction arrives in Flower's legacy ``FitIns`` layout and the reply must be a
``FitRes``, whose parameters the mod quantizes, masks and sends; the server never sees them one by one.
fedpers sends the *update* (trained − received shared tensors) rather than the tensors themselves: the
update is small, so the quantization grid (``secagg.clipping-range`` / 2²²) is fine, and a coordinate
outside the range is refused here instead of being clipped silently by the quantizer. Because the
server cannot check a single reply, this client checks its own update first (finite, in range, within
``fed.max-update-norm``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from common import protocol as P
from common.config import Config
from common.errors import ParameterError

Arrays = dict[str, np.ndarray]
FITINS = "fitins.parameters"


class _Refused(Exception):
    """The train handler replied with an error inside a SecAgg+ round."""

    def __init__(self, reply: Message) -> None:
        super().__init__(str(reply.error.reason))
        self.reply = reply


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for messages that carry a SecAgg+ stage; everything else passes through.

    A refusal (budget exhausted, damaged state, an update out of range) goes back as the handler's own
    error reply, reason included; the server then treats this client as dropped out for the round.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def guarded(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():
            raise _Refused(reply)
        return reply

    try:
        return secaggplus_mod(msg, context, guarded)
    except _Refused as refused:
        return refused.reply


def is_legacy_fit(content: RecordDict) -> bool:
    """Whether a train instruction is in the legacy FitIns layout (SecAgg+ rounds)."""
    return FITINS in content.array_records


def read_fitins(content: RecordDict) -> tuple[Arrays, int]:
    """(shared tensors by name, server round) from a FitIns instruction; a clear error if malformed."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    names = str(fitins.config.get(P.SHARED_NAMES, ""))
    arrays = parameters_to_ndarrays(fitins.parameters)
    keys = names.split(",") if names else []
    if len(keys) != len(arrays):
        raise ParameterError(f"SecAgg+ instruction names {len(keys)} tensors but carries {len(arrays)}")
    return dict(zip(keys, arrays, strict=True)), int(fitins.config.get(P.SERVER_ROUND, 0))


def update_for_secagg(
    cfg: Config, received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """The update to mask (trained − received, in the server's name order), checked first."""
    names = sorted(received)
    update = [np.asarray(trained[k], np.float64) - np.asarray(received[k], np.float64) for k in names]
    if not all(np.isfinite(u).all() for u in update):
        raise ParameterError("the update has non-finite values: not sent")
    peak = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if peak > cfg.secagg.clipping_range:
        raise ParameterError(
            f"an update coordinate of {peak:.3g} is outside secagg.clipping-range "
            f"{cfg.secagg.clipping_range:g} (the quantizer would clip it): raise the range or lower the lr"
        )
    norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
    if cfg.fed.max_update_norm > 0 and norm > cfg.fed.max_update_norm:
        raise ParameterError(f"update norm {norm:.3g} exceeds fed.max-update-norm: not sent")
    return [u.astype(np.float32) for u in update]


def fitres_content(cfg: Config, update: list[np.ndarray], metrics: Mapping[str, float | int]) -> RecordDict:
    """The FitRes reply the SecAgg+ mod masks (its parameters never leave the device unmasked)."""
    weight = int(metrics[P.NUM_EXAMPLES])
    limit = cfg.secagg_max_weight()
    if weight > limit:
        raise ParameterError(
            f"{weight} examples exceed secagg.max-weight {limit}: the masked sum would overflow"
        )
    plain = {k: v for k, v in metrics.items() if k != P.UPDATE_NORM}  # the norm would leak through metrics
    res = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=ndarrays_to_parameters(update),
        num_examples=weight,
        metrics=dict(plain),
    )
    return compat.fitres_to_recorddict(res, keep_input=False)
