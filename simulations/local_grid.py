"""The plain loop: the real ServerApp federation over an in-process Grid, no Ray, no SuperLink.

``run_local`` runs ``server.app.run_federation`` (the same strategy, reply validation, ledger,
checkpoints, report, user-level DP, fractions, update-norm bound and SecAgg+ workflow as ``flwr run``)
over :class:`LocalGrid`, which hands each instruction to a real ClientApp (``client.app``) in this
process, one node after another, and returns its real reply. There is no second round loop.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.config import Config

NODE_ID_BASE = 1000  # node ids are NODE_ID_BASE + partition id (the ledger keys clients by partition)


class LocalGrid(Grid):
    """In-process transport: each instruction goes to a real ClientApp; its real reply comes back."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 7) -> None:
        self.app, self.run_id = client_app, run_id
        self.nodes = {NODE_ID_BASE + i: i for i in range(num_nodes)}
        self.contexts: dict[int, Context] = {}  # one per node, kept across messages as a SuperNode does

    def set_run(self, run: Run) -> None:
        """Not used: a LocalGrid serves the one run it was made for."""
        raise NotImplementedError("a LocalGrid serves the run it was created for")

    @property
    def run(self) -> Run:
        """The run (Flower's legacy client manager reads its id)."""
        return Run.create_empty(self.run_id)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """An instruction message, as ``Grid.create_message`` makes it."""
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """Every simulated node (all are always connected)."""
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used: instructions are delivered synchronously by :meth:`send_and_receive`."""
        raise NotImplementedError("LocalGrid delivers messages only through send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used: replies are returned by :meth:`send_and_receive`."""
        raise NotImplementedError("LocalGrid delivers messages only through send_and_receive")

    def context(self, node: int) -> Context:
        """The node's persistent context (partition id and count in its node config)."""
        return self.contexts.setdefault(
            node,
            Context(
                run_id=self.run_id,
                node_id=node,
                state=RecordDict(),
                run_config={},
                node_config={"partition-id": self.nodes[node], "num-partitions": len(self.nodes)},
            ),
        )

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Each message's reply from its node's ClientApp, in order (``timeout`` has nothing to wait on)."""
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            out.append(self.app(copy.deepcopy(msg), self.context(node)))  # a copy, as over the wire
        return out


@contextlib.contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """Flower's task identity of a ServerApp (instruction messages read it), restored afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_local(
    overrides: Mapping[str, Any],
    num_clients: int,
    limits: Mapping[str, Any] | None = None,
    users: Mapping[int, str] | None = None,
) -> Path:
    """Run the federation of ``overrides`` over ``num_clients`` in-process nodes; returns the run folder.

    ``limits``: the simulated devices' own privacy limits; ``users``: partition id → user name (the
    report's).
    """
    from client.app import make_client_app
    from server.app import run_federation

    cfg = Config.from_run_config(dict(overrides))
    run_id = time.time_ns() % (1 << 63)
    grid = LocalGrid(make_client_app(overrides, limits), num_clients, run_id=run_id)
    with server_identity(run_id):
        return run_federation(cfg, grid, run_id, None, users, by_partition=True)
