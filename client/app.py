"""The Flower ClientApp (thin: all logic lives in client.node).

In a deployment every message runs in a fresh ``flwr-clientapp`` process (Flower 1.41 serves one
message per process in both SuperNode isolation modes), so this module imports torch, transformers,
PEFT and Opacus only inside the handlers that train or evaluate: the three SecAgg+ key-exchange stages
of a round are handled by Flower's mod alone and skip those ~4 s of imports.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secagg import fitres_content, is_legacy_fit, read_fitins, secagg_mod, update_for_secagg
from common import protocol as P
from common.config import Config
from common.errors import FedpersError
from common.runs import client_cache_dir, client_state_dir

if TYPE_CHECKING:
    from client.node import NodeInfo

logging.getLogger("flwr").propagate = False
ERROR_CODE = 4001  # a fedpers refusal (budget, state, data): the server logs it and carries on


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"`,;:()]+)+")


def public_reason(exc: Exception, known: tuple[str | None, ...] = ()) -> str:
    """What a refusal tells the server: the error without file paths (they name the user's folders).

    ``known``: this node's own paths, removed whole first (a path with spaces defeats the pattern).
    """
    text = f"{type(exc).__name__}: {exc}"
    for path in sorted({p for p in (*known, str(Path.home())) if p and len(p) > 1}, key=len, reverse=True):
        text = text.replace(path, "<path>")
    return _PATH.sub("<path>", text)


def _refusal(msg: Message, exc: Exception, context: Context) -> Message:
    """The error reply for a refused instruction (the reason without this device's paths)."""
    nc = context.node_config
    own = tuple(str(nc[k]) for k in ("state-dir", "data-path", "key-file", "feature-cache") if nc.get(k))
    return Message(Error(code=ERROR_CODE, reason=public_reason(exc, own)), reply_to=msg)


def node_info(cfg: Config, context: Context, limits: Mapping[str, Any] | None = None) -> NodeInfo:
    """Partition, state folder, data path and privacy limits of this node.

    ``context.node_config`` (a deployed agent's flags) wins over ``limits`` (a simulation's device
    settings), which win over the defaults.
    """
    from client.node import NodeInfo

    nc = {**dict(limits or {}), **dict(context.node_config)}
    pid = int(nc.get("partition-id", 0))
    state_dir = (
        Path(str(nc["state-dir"])) if nc.get("state-dir") else client_state_dir(cfg, context.run_id, pid)
    )
    return NodeInfo(
        partition_id=pid,
        num_partitions=int(nc.get("num-partitions", 1)),
        state_dir=state_dir,
        run_id=context.run_id,
        data_path=str(nc["data-path"]) if nc.get("data-path") else None,
        key_file=str(nc["key-file"]) if nc.get("key-file") else None,
        device=str(nc.get("device", "auto")),
        max_physical_batch=int(nc.get("max-physical-batch", 0)),
        feature_cache=(
            Path(str(nc["feature-cache"])) if nc.get("feature-cache") else client_cache_dir(cfg, pid)
        ),
        max_epsilon=float(nc["max-epsilon"]) if float(nc.get("max-epsilon", 0) or 0) > 0 else None,
        delta=float(nc.get("delta", 0.0)),
        allow_no_dp=bool(nc.get("allow-no-dp", True)),
    )


def make_client_app(
    overrides: Mapping[str, Any] | None = None, limits: Mapping[str, Any] | None = None
) -> ClientApp:
    """A ClientApp whose configuration is ``context.run_config`` on top of ``overrides``.

    ``limits``: the simulated devices' own privacy limits (node-config keys ``max-epsilon``, ``delta``,
    ``allow-no-dp``), which a run config cannot change.
    """
    base = dict(overrides or {})
    client_app = ClientApp()

    def _cfg(context: Context) -> Config:
        return Config.from_run_config({**base, **dict(context.run_config)})

    @client_app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        from client.node import run_train
        from common.params import from_record, to_record

        cfg = _cfg(context)
        legacy = is_legacy_fit(msg.content)  # a SecAgg+ round: FitIns in, FitRes (masked by the mod) out
        try:
            if legacy:
                shared, server_round = read_fitins(msg.content)
            else:
                shared = from_record(msg.content.array_records.get(P.ARRAYS, ArrayRecord()))
                server_round = int(msg.content.config_records[P.CONFIG].get(P.SERVER_ROUND, 0))  # type: ignore[arg-type]
            arrays, metrics = run_train(cfg, node_info(cfg, context, limits), shared, server_round)
            if legacy:
                update = update_for_secagg(cfg, shared, arrays)
                return Message(content=fitres_content(cfg, update, metrics), reply_to=msg)
        except FedpersError as exc:
            logging.getLogger("flwr").warning("client refused to train: %s", exc)
            return _refusal(msg, exc, context)
        record = MetricRecord(metrics)  # type: ignore[arg-type]
        content = RecordDict({P.ARRAYS: to_record(arrays), P.METRICS: record})
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from client.node import run_evaluate
        from common.params import from_record

        cfg = _cfg(context)
        shared = from_record(msg.content.array_records.get(P.ARRAYS, ArrayRecord()))
        config = msg.content.config_records.get(P.CONFIG, ConfigRecord())
        try:
            metrics = run_evaluate(
                cfg, node_info(cfg, context, limits), shared, bool(config.get(P.FINAL_ROUND, False))
            )
        except FedpersError as exc:
            logging.getLogger("flwr").warning("client refused to evaluate: %s", exc)
            return _refusal(msg, exc, context)
        record = MetricRecord(metrics)  # type: ignore[arg-type]
        return Message(content=RecordDict({P.METRICS: record}), reply_to=msg)

    return client_app


app = make_client_app()
