"""Flower's simulation message poller, made to cost what is waiting instead of nodes × messages.

In flwr 1.41 the Simulation Engine hands instructions to its actors from one thread of the process that
runs the simulation (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``). Every 0.1 s it
asks the in-memory LinkState for the next message of *each* of the N simulated nodes, and each of those
calls (``InMemoryLinkState.get_message_ins``) walks every stored message, re-validating each one
(expiry, federation) under the state's lock. A sweep is therefore O(N × M) for M stored messages, and
messages stay stored after delivery until their replies are pulled. At N = 1,000 with a cohort of 50 this
thread kept about half a core busy through every round, and during the evaluation of all 1,000 users
(M = 1,000) a whole core, out of the 2 the machine has (``fedpers bench sim-speed --workload
cross-device``; py-spy on the driver process: 90 % of its samples in this loop).

:func:`install` replaces that thread's target with :func:`deliver_waiting`: one pass over the stored
messages finds the nodes that have an undelivered one, and only those nodes are asked, through the same
``get_message_ins`` (so expiry, validation, the delivery mark and the one-message-per-node-per-sweep order
are Flower's own). Nodes with nothing waiting cost a set lookup. Nothing else in the engine changes.

It is applied only where it was checked: the flwr series :data:`CHECKED` (pyproject pins ``flwr <
1.42``), a ``vce_api`` that still defines the poller, and an ``InMemoryLinkState`` with the
``message_ins_store`` and ``lock`` this reads. Otherwise Flower's own poller runs, and a debug line says
why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from queue import Queue
from typing import Any

LOG = logging.getLogger(__name__)
CHECKED = "1.41."  # the flwr series whose LinkState this reads


def waiting_nodes(state: Any) -> set[int]:
    """The destination nodes of the instructions stored in ``state`` and not yet delivered."""
    with state.lock:
        return {
            m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""
        }


def sweep(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int]) -> int:
    """One pass of the poller: at most one message per node with one waiting, in the nodes' order.

    Returns how many messages were queued."""
    waiting = waiting_nodes(state)
    queued = 0
    if not waiting:
        return queued
    for node_id in nodes_mapping:
        if node_id in waiting:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
                queued += 1
    return queued


def deliver_waiting(
    state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """Drop-in for flwr's ``add_messages_to_queue``: :func:`sweep` every 0.1 s until ``f_stop`` is set."""
    while not f_stop.is_set():
        sweep(state, queue, nodes_mapping)
        f_stop.wait(0.1)


def why_not() -> str | None:
    """Why the poller cannot be replaced in this environment (``None``: it can)."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    version = getattr(flwr, "__version__", "")
    if not version.startswith(CHECKED):
        return f"flwr {version} is not the checked series {CHECKED}x"
    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        return "flwr's vce_api has no add_messages_to_queue"
    init = InMemoryLinkState.__init__.__code__
    if not {"message_ins_store", "lock"} <= set(init.co_names):
        return "InMemoryLinkState keeps no message_ins_store / lock"
    return None


def install() -> bool:
    """Make the Simulation Engine in this process use :func:`deliver_waiting`; True when it does."""
    reason = why_not()
    if reason:
        LOG.debug("Flower's own message poller kept: %s", reason)
        return False
    from flwr.server.superlink.fleet.vce import vce_api

    vce_api.add_messages_to_queue = deliver_waiting  # type: ignore[assignment]
    return True
