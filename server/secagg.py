"""Secure aggregation (Flower's SecAgg+): the server learns only the weighted mean of the shared updates.

Flower 1.41 implements SecAgg+ only through its legacy workflow API (``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` over a ``LegacyContext``), so this module adapts fedpers to it rather than forking
the protocol:

- :class:`SecAggStrategy` is the legacy ``Strategy`` the workflow drives. It samples the cohort, sends
  the current shared tensors, and receives ONE aggregate: the SecAgg+ sum of every client's masked,
  quantized *update* (reply − current), divided by the summed weights. It adds that mean update to the
  global tensors and reuses :class:`FedpersStrategy` for the ledger, the metrics and the checkpoints.
- Evaluation keeps fedpers' own Message-API path (:func:`evaluate_workflow`), with the round timeout
  (the legacy one has none).

What changes under SecAgg+: no single reply is visible to the server, so the per-reply checks (key set,
shapes, finite values, the update-norm bound) run on each client before masking (``client.secagg``),
and the server checks the aggregate (shapes, finite, norm). A malicious client can therefore poison
the sum unnoticed, which is the usual trade-off of secure aggregation. Per-client metrics (ε, steps,
losses) still travel in plain text for the ledger. Settings SecAgg+ cannot support fail up front in
:func:`check_secagg`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from common import protocol as P
from common.config import Config
from common.errors import ConfigError, ParameterError
from common.params import check_arrays, to_record
from server.strategy import FedpersStrategy, sender


def check_secagg(cfg: Config, shared: list[str]) -> None:
    """Raise a ConfigError when SecAgg+ is on but the model shares no tensors (its tensor names decide).

    SecAgg+'s other rules need only the config: :class:`common.config.SecAggConfig` and
    ``common.config._check_secagg`` refuse them when the config is built.
    """
    if cfg.secagg.enabled and not shared:
        raise ConfigError(
            f"personalization.mode = {cfg.personalization.mode!r} shares no tensors of model.name = "
            f"{cfg.model.name!r}: nothing to aggregate securely (turn secagg.enabled off)"
        )


class SecAggStrategy(Strategy):
    """The legacy Strategy SecAgg+ drives; the bookkeeping is :class:`FedpersStrategy`'s."""

    def __init__(self, inner: FedpersStrategy, initial: dict[str, np.ndarray]) -> None:
        self.inner = inner
        self.names = sorted(inner.expected)
        self.inner.current = {k: initial[k] for k in self.names}
        self.committed = 0  # the last round whose ledger and checkpoint were saved
        self.round = 0

    def _params(self, arrays: dict[str, np.ndarray]) -> Parameters:
        return ndarrays_to_parameters([arrays[k] for k in self.names])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The current global shared tensors (checkpoint or seeded build)."""
        return self._params(self.inner.current)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample the cohort as FedAvg does; each gets the global tensors and the round number."""
        s = self.inner
        s._round_start = time.perf_counter()
        rnd = server_round + s.offset
        self.round = rnd
        available = client_manager.num_available()
        size = max(int(available * s.fraction_train), s.min_train_nodes)
        proxies = client_manager.sample(num_clients=size, min_num_clients=s.min_available_nodes)
        s._cohort, s._population = len(proxies), client_manager.num_available()
        config: dict[str, Scalar] = {
            P.SERVER_ROUND: rnd,
            "num-rounds": s.total_rounds,
            P.SHARED_NAMES: ",".join(self.names),
        }
        log(INFO, "round %d: SecAgg+ over %d of %d clients", rnd, len(proxies), available)
        return [(p, FitIns(parameters, dict(config))) for p in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Add the securely aggregated mean update to the global tensors (after checking it)."""
        s = self.inner
        rnd = server_round + s.offset
        new = None  # failures were recorded with their node ids as they arrived (WatchedGrid)
        for proxy, res in results:
            metrics, node = dict(res.metrics), proxy.node_id
            client = s.client_of(node, metrics)
            s.ledger.record(rnd, node, "accepted", metrics, client=client)
            s.recorder.train_reply(rnd, node, metrics, float("nan"), client=client)
        if results:
            try:
                new = s.server_step(self._apply(rnd, parameters_to_ndarrays(results[0][1].parameters)))
            except ParameterError as exc:
                log(WARNING, "round %d: secure aggregate rejected, global model unchanged: %s", rnd, exc)
                s.recorder.rejection(rnd, -1, f"secure aggregate: {exc}")
        metrics = self.commit(rnd, new)
        return (self._params(new) if new is not None else None), dict(metrics or {})

    def commit(self, rnd: int, new: dict[str, np.ndarray] | None) -> Any:
        """Save the round (once): also called for a round SecAgg+ halted (too few clients left)."""
        self.committed = rnd
        return self.inner.commit_round(rnd, new)

    def refused(self, rnd: int, node: int, reason: str) -> None:
        """A client's error reply in any SecAgg+ stage (its budget, its state, a dropout it reported)."""
        log(WARNING, "round %d: node %d refused or failed under SecAgg+: %s", rnd, node, reason)
        self.inner.ledger.record(rnd, node, "refused", {}, reason, client=self.inner.client_of(node, {}))
        self.inner.recorder.refusal(rnd, node, reason)

    def _apply(self, rnd: int, mean_update: list[np.ndarray]) -> dict[str, np.ndarray]:
        s = self.inner
        if len(mean_update) != len(self.names):
            raise ParameterError(f"aggregate has {len(mean_update)} tensors, expected {len(self.names)}")
        update = dict(zip(self.names, mean_update, strict=True))
        new = {k: (s.current[k].astype(np.float64) + update[k]).astype(np.float32) for k in self.names}
        check_arrays(new, s.expected, what="secure aggregate")
        norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in mean_update)))
        if s.max_update_norm > 0 and norm > s.max_update_norm:
            raise ParameterError(f"mean update norm {norm:.3g} exceeds fed.max-update-norm")
        log(INFO, "round %d: secure aggregate of %d tensors, mean update norm %.4g", rnd, len(new), norm)
        return new

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Unused: evaluation runs through :func:`evaluate_workflow`."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Unused: evaluation runs through :func:`evaluate_workflow`."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No server-side evaluation (the test data lives on the clients)."""
        return None


def evaluate_workflow(strategy: SecAggStrategy, timeout: float) -> Any:
    """A legacy evaluate step that runs fedpers' Message-API evaluation with a timeout."""

    def run(grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])  # type: ignore[arg-type]
        inner = strategy.inner
        if strategy.committed < rnd + inner.offset:  # SecAgg+ halted this round: keep the model, save
            log(WARNING, "round %d: SecAgg+ halted, global model unchanged", rnd + inner.offset)
            strategy.commit(rnd + inner.offset, None)
        arrays = to_record(inner.current)
        messages = list(
            inner.configure_evaluate(rnd, arrays, ConfigRecord({"num-rounds": inner.total_rounds}), grid)
        )
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
        inner.aggregate_evaluate(rnd, replies)  # also writes the round's line to metrics.jsonl

    return run


class WatchedGrid:
    """The ServerApp's Grid, passing every SecAgg+ (train) error reply to the strategy with its node id."""

    def __init__(self, grid: Grid, strategy: SecAggStrategy) -> None:
        self._grid, self._strategy = grid, strategy

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's send_and_receive; error replies are recorded as refusals first."""
        sent = list(messages)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        for msg in replies:
            if msg.has_error() and msg.metadata.message_type == MessageType.TRAIN:
                self._strategy.refused(self._strategy.round, sender(msg, sent), str(msg.error.reason))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def run_secagg(
    cfg: Config, grid: Grid, context: Context, inner: FedpersStrategy, initial: dict[str, np.ndarray]
) -> None:
    """Run the remaining rounds with SecAgg+ for training and fedpers' evaluation."""
    strategy = SecAggStrategy(inner, initial)
    sa = cfg.secagg
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=cfg.fed.num_rounds - inner.offset, round_timeout=None),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=sa.num_shares,
            reconstruction_threshold=sa.threshold,
            max_weight=float(cfg.secagg_max_weight()),
            clipping_range=sa.clipping_range,
            timeout=cfg.fed.round_timeout,
        ),
        evaluate_workflow=evaluate_workflow(strategy, cfg.fed.round_timeout),
    )
    workflow(WatchedGrid(grid, strategy), legacy)  # type: ignore[arg-type]
