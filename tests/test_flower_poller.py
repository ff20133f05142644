"""The simulation poller that replaces Flower's: same deliveries from a real in-memory LinkState, once."""

from __future__ import annotations

import queue
import threading
from typing import Any, cast

import pytest
from flwr.app import Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from simulations import flower_poller as FP

RUN_ID, TASK_ID, SUPERLINK = 7, 3, 1


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[int, int], InMemoryGrid]:
    """A real in-memory LinkState with a run and 40 registered nodes, as Flower's simulation sets it up."""
    for name, value in (("_task_id", 1), ("_run_id", RUN_ID), ("_node_id", SUPERLINK)):
        monkeypatch.setattr(TaskIdentity, name, value)  # what run_simulation sets; unset again after
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = cast(InMemoryLinkState, factory.state())
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    nodes = vce_api._register_nodes(40, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, nodes, grid


def _push(grid: InMemoryGrid, node_ids: list[int]) -> list[str]:
    return list(
        grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="train") for n in node_ids])
    )


def _drain(q: queue.Queue[Any]) -> list[Any]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_a_sweep_delivers_what_flowers_poller_would_once_in_node_order(link: Any) -> None:
    state, nodes, grid = link
    ids = list(nodes)
    cohort = ids[::3]  # every third node has an instruction waiting
    pushed = _push(grid, list(reversed(cohort)))  # stored in another order than the nodes'
    assert FP.waiting_nodes(state) == set(cohort)
    q: queue.Queue[Any] = queue.Queue()
    assert FP.sweep(state, q, nodes) == len(cohort)
    got = _drain(q)
    assert [m.metadata.dst_node_id for m in got] == cohort  # Flower's order: the nodes', one each
    assert {m.metadata.message_id for m in got} == set(pushed)
    assert all(m.metadata.delivered_at for m in got)  # marked by Flower's own get_message_ins
    assert FP.sweep(state, q, nodes) == 0 and FP.waiting_nodes(state) == set()  # delivered once

    two = _push(grid, [ids[1], ids[1]])  # a node with two waiting gets one per sweep, as in Flower
    assert FP.sweep(state, q, nodes) == 1 and FP.sweep(state, q, nodes) == 1
    assert {m.metadata.message_id for m in _drain(q)} == set(two)

    flower_q: queue.Queue[Any] = queue.Queue()  # Flower's own sweep finds nothing left either
    for node_id in nodes:
        for msg in state.get_message_ins(node_id=node_id, limit=1):
            flower_q.put(msg)
    assert flower_q.empty()


def test_the_thread_stops_and_install_replaces_only_the_poller(
    link: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, nodes, grid = link
    _push(grid, list(nodes)[:5])
    q: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=FP.deliver_waiting, args=(state, q, nodes, stop))
    thread.start()
    try:
        first = q.get(timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive() and first.metadata.dst_node_id in nodes

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)  # restored after
    assert FP.why_not() is None and FP.install()
    assert vce_api.add_messages_to_queue is FP.deliver_waiting
    monkeypatch.setattr(FP, "CHECKED", "0.9.")
    assert "not the checked series" in (FP.why_not() or "")
