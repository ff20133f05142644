"""FedpersStrategy: Flower's Message-API FedAvg with fedpers hooks (never a copy of ``start()``).

Hooks add: reply validation (a personal key is logged as a privacy violation), weighted aggregation of
the shared tensors only, the privacy ledger, a checkpoint per round, per-round metrics, and a round
offset so a resumed run continues its numbering.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common import protocol as P
from common.errors import PrivacyBudgetExhausted
from common.params import from_record, to_record
from common.privacy import compose
from server import checkpoint
from server.ledger import Ledger
from server.recorder import Recorder
from server.server_opt import ServerOptimizer
from server.user_dp import UserLevelDP
from server.validation import PrivacyViolation, validate_reply, weighted_average


def sender(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply is about: its source, or for an error the SuperLink wrote itself ("Node
    Unavailable", a timeout), the node the instruction went to."""
    node = int(reply.metadata.src_node_id)
    if node != SUPERLINK_NODE_ID:
        return node
    asked = reply.metadata.reply_to_message_id
    return next((int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id == asked), node)


class FedpersStrategy(FedAvg):
    """FedAvg over the shared tensors, with validation, ledger, checkpoints and metrics."""

    def __init__(
        self,
        *,
        expected: dict[str, tuple[int, ...]],
        personal: set[str],
        ledger: Ledger,
        recorder: Recorder,
        checkpoint_dir: str,
        run_config: dict[str, Any],
        total_rounds: int,
        round_offset: int = 0,
        max_update_norm: float = 0.0,
        user_dp: UserLevelDP | None = None,
        server_opt: ServerOptimizer | None = None,
        client_key: str = "node",
        evaluate_every: int = 1,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(arrayrecord_key=P.ARRAYS, configrecord_key=P.CONFIG, **fedavg_kwargs)
        self.expected = expected
        self.personal = personal
        self.ledger = ledger
        self.recorder = recorder
        self.checkpoint_dir = checkpoint_dir
        self.run_config = run_config
        self.total_rounds = total_rounds
        self.offset = round_offset
        self.max_update_norm = max_update_norm
        self.current: dict[str, np.ndarray] = {}
        self._round_start = time.perf_counter()
        self.user_dp = user_dp
        self.server_opt = server_opt or ServerOptimizer()
        if client_key not in ("node", "partition"):
            raise ValueError(f"client_key must be 'node' or 'partition', got {client_key!r}")
        self.client_key = client_key
        if evaluate_every < 1:
            raise ValueError(f"evaluate_every must be >= 1, got {evaluate_every}")
        self.evaluate_every = evaluate_every
        self._cohort: float = 0.0  # the fixed denominator of a user-level release (expected under Poisson)
        self._population = 0
        self._sent: list[Message] = []  # this round's instructions (an error reply names its node by them)
        if user_dp is not None:  # a resumed or continued federation keeps composing its user-level ε
            for e in ledger.user_level_entries():
                user_dp.history = compose(
                    user_dp.history, e["user-noise-multiplier"], e["user-sample-rate"], 1
                )
                user_dp.clipping_norm = float(e["user-next-clipping-norm"])

    def client_of(self, node: int, metrics: dict[str, Any]) -> int:
        """The client a reply belongs to: its node id (a device), or its partition id (a simulation)."""
        if self.client_key == "partition" and P.PARTITION_ID in metrics:
            return int(metrics[P.PARTITION_ID])  # type: ignore[arg-type]
        return int(node)

    # -- train ------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the current global tensors and number the round past any resumed ones."""
        self._round_start = time.perf_counter()
        self.current = from_record(arrays)
        if self._poisson():
            messages = self._poisson_cohort(server_round + self.offset, arrays, config, grid)
        else:
            messages = list(super().configure_train(server_round + self.offset, arrays, config, grid))
            self._cohort, self._population = len(messages), len(list(grid.get_node_ids()))
        self._sent = messages
        return messages

    def _poisson(self) -> bool:
        """Whether cohorts are Poisson samples: user-level DP accounted with q = fed.fraction-train < 1."""
        return self.user_dp is not None and self.user_dp.sampling == "poisson" and self.fraction_train < 1

    def _poisson_cohort(
        self, rnd: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Ask each connected node independently with probability q (OS entropy): the sampling accounted.

        The cohort's size varies (it may be empty); the release divides by the expected size q·N.
        """
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)  # waits until enough are connected
        draw = secrets.SystemRandom()
        chosen = [n for n in nodes if draw.random() < self.fraction_train]
        self._cohort, self._population = self.fraction_train * len(nodes), len(nodes)
        log(INFO, "round %d: Poisson cohort of %d nodes (expected %.1f)", rnd, len(chosen), self._cohort)
        config["server-round"] = rnd
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, chosen, MessageType.TRAIN))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop bad ones with a logged reason, average the rest."""
        rnd = server_round + self.offset
        accepted: list[tuple[dict[str, np.ndarray], float]] = []
        for msg in replies:
            node = sender(msg, self._sent)
            if msg.has_error():
                reason = str(msg.error.reason)
                log(WARNING, "round %d: node %d refused or failed: %s", rnd, node, reason)
                self.ledger.record(rnd, node, "refused", {}, reason, client=self.client_of(node, {}))
                self.recorder.refusal(rnd, node, reason)
                continue
            metrics = dict(next(iter(msg.content.metric_records.values()), MetricRecord()))
            client = self.client_of(node, metrics)
            record = msg.content.array_records.get(P.ARRAYS)
            try:
                for other in msg.content.array_records.values():
                    leaked = sorted(set(other.keys()) & self.personal)
                    if leaked:
                        raise PrivacyViolation(f"reply carries personal tensors {leaked[:3]}")
                if record is None or len(msg.content.array_records) != 1:
                    raise ValueError(f"reply must carry exactly one ArrayRecord named '{P.ARRAYS}'")
                arrays = from_record(record)
                norm = validate_reply(
                    arrays,
                    metrics,
                    expected=self.expected,
                    personal=self.personal,
                    current=self.current,
                    max_update_norm=self.max_update_norm,
                )
                self.ledger.check_no_rollback(client, metrics)
            except PrivacyViolation as exc:
                log(WARNING, "round %d: PRIVACY VIOLATION by node %d, reply dropped: %s", rnd, node, exc)
                self.ledger.record(rnd, node, "rejected", metrics, f"privacy violation: {exc}", client=client)
                self.recorder.rejection(rnd, node, f"privacy violation: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - any malformed reply is dropped, never aggregated
                log(WARNING, "round %d: reply of node %d rejected: %s", rnd, node, exc)
                self.ledger.record(rnd, node, "rejected", metrics, str(exc), client=client)
                self.recorder.rejection(rnd, node, str(exc))
                continue
            accepted.append((arrays, float(metrics[P.NUM_EXAMPLES])))  # type: ignore[arg-type]
            self.ledger.record(rnd, node, "accepted", metrics, client=client)
            self.recorder.train_reply(rnd, node, metrics, norm, client=client)
        log(INFO, "round %d: aggregating %d valid replies", rnd, len(accepted))
        if self.user_dp is not None:
            new = self._user_level_release(rnd, [a for a, _ in accepted])
        else:
            new = weighted_average(accepted, sorted(self.expected)) if accepted else None
        new = self.server_step(new)
        return (to_record(new) if new is not None else None), self.commit_round(rnd, new)

    def server_step(self, aggregate: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """The new global tensors: the server optimizer's step towards ``aggregate`` (None: no update)."""
        return None if aggregate is None else self.server_opt.step(self.current, aggregate)

    def commit_round(self, rnd: int, new: dict[str, np.ndarray] | None) -> MetricRecord | None:
        """Save the ledger and a checkpoint of round ``rnd``, adopt ``new`` (None: keep the current)."""
        self.ledger.save()
        checkpoint.save(
            self.checkpoint_dir,
            checkpoint.Checkpoint(
                rnd, new if new is not None else self.current, self.run_config, self.server_opt.velocity
            ),
        )
        if new is not None:
            self.current = new
        metrics_out = self.recorder.train_summary(rnd)
        return MetricRecord(dict(metrics_out)) if metrics_out else None  # type: ignore[arg-type]

    def _user_level_release(
        self, rnd: int, replies: list[dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray] | None:
        """Clip, average uniformly and noise the replies; None (no release) when the budget forbids it."""
        if self.user_dp is None or not self.expected:  # nothing shared (local): nothing released
            return None
        if not (replies or self._poisson()):  # a Poisson round releases even when nobody was drawn
            return None
        cohort = self._cohort if self._poisson() else max(self._cohort, len(replies))
        budget = self.user_dp.budget
        if budget > 0 and self.user_dp.noise_multiplier <= 0:  # calibrate z once for the rounds left
            try:
                z = self.user_dp.calibrate(cohort, self._population, max(1, self.total_rounds - rnd + 1))
            except PrivacyBudgetExhausted as exc:
                log(WARNING, "round %d: %s; the global model is not updated", rnd, exc)
                self.ledger.record_user_level(rnd, "refused", {"reason": str(exc)})
                return None
            log(INFO, "user-level noise multiplier z = %.3f for ε = %g over the rounds left", z, budget)
        if budget > 0 and self.user_dp.epsilon_after(cohort, self._population) > budget * (1 + 1e-9):
            reason = f"user-level budget ε={budget} would be exceeded; the global model is not updated"
            log(WARNING, "round %d: %s", rnd, reason)
            self.ledger.record_user_level(rnd, "refused", {"reason": reason})
            return None
        new, info = self.user_dp.release(self.current, replies, cohort, self._population)
        self.ledger.record_user_level(rnd, "released", info)
        log(
            INFO,
            "round %d: user-level DP release, ε=%.3f (δ=%.1e)",
            rnd,
            info["user-epsilon"],
            info["user-delta"],
        )
        return new

    # -- evaluate ---------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flag the final round (fedavg-ft fine-tunes before its last evaluation).

        Clients are evaluated every ``evaluate_every`` rounds and always in the final one.
        """
        rnd = server_round + self.offset
        config[P.FINAL_ROUND] = rnd >= self.total_rounds
        if not config[P.FINAL_ROUND] and rnd % self.evaluate_every:
            self._sent = []
            return []
        self._sent = list(super().configure_evaluate(server_round + self.offset, arrays, config, grid))
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each client's personalized test accuracy; return the weighted mean."""
        rnd = server_round + self.offset
        for msg in replies:
            node = sender(msg, self._sent)
            if msg.has_error():
                self.recorder.refusal(rnd, node, str(msg.error.reason))
                continue
            metrics = dict(next(iter(msg.content.metric_records.values()), MetricRecord()))
            client = self.client_of(node, metrics)
            self.recorder.eval_reply(rnd, node, metrics, client=client)
            if P.STEPS in metrics and P.EPSILON in metrics:  # fedavg-ft spent budget while fine-tuning
                self.ledger.record(rnd, node, "finetune", metrics, client=client)
        self.ledger.save()
        summary = self.recorder.end_round(rnd, time.perf_counter() - self._round_start)
        return MetricRecord(dict(summary)) if summary else None  # type: ignore[arg-type]
