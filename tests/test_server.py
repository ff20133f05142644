"""Server side without Ray: reply validation, weighted aggregation, the ledger, refusals, round numbering.

Replies are real Flower Messages (built as replies to real instructions) holding real tensors of the tiny
model's shared LoRA parameters; the strategy, ledger, recorder and checkpoint are the real ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY, LocalGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType

from client.app import make_client_app
from common import protocol as P
from common.config import Config
from common.errors import ParameterError
from common.params import from_record, get_arrays, shapes_of
from common.split import split_names
from common.tasks import get_backbone
from server import checkpoint
from server.app import run_federation
from server.ledger import Ledger
from server.recorder import Recorder
from server.server_opt import ServerOptimizer
from server.strategy import FedpersStrategy
from server.validation import PrivacyViolation, validate_reply, weighted_average

Arrays = dict[str, np.ndarray]
WEIGHTS = (10, 30, 60)


class Model:
    """The tiny model's shared/personal split and initial tensors."""

    def __init__(self) -> None:
        self.cfg = Config.from_run_config(TINY)
        template = get_backbone(self.cfg).template
        roles = split_names([n for n, _ in template.named_parameters()], "fedper")
        self.shared: list[str] = roles["shared"]
        self.personal: list[str] = roles["personal"]
        self.shapes = shapes_of(template, self.shared)
        self.initial = get_arrays(template, self.shared)
        self.head = get_arrays(template, self.personal)


@pytest.fixture(scope="module")
def model() -> Model:
    m = Model()
    assert len(m.shared) == 4 and all("lora_" in n for n in m.shared)
    assert m.personal == ["head.bias", "head.weight"]
    return m


@pytest.fixture
def flwr_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture Flower's logger (server.app turns its propagation off)."""
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def make_strategy(model: Model, folder: Path, **kwargs: Any) -> FedpersStrategy:
    strategy = FedpersStrategy(
        expected=model.shapes,
        personal=set(model.personal),
        ledger=Ledger(folder / "ledger.json"),
        recorder=Recorder(folder, 2),
        checkpoint_dir=str(folder / "checkpoint"),
        run_config=model.cfg.to_run_config(),
        total_rounds=2,
        max_update_norm=model.cfg.fed.max_update_norm,
        **kwargs,
    )
    strategy.current = {k: v.copy() for k, v in model.initial.items()}
    return strategy


def instruction(node: int) -> Message:
    return Message(
        RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )


def reply(
    node: int, arrays: Arrays | None, metrics: dict[str, Any], extra: dict[str, Arrays] | None = None
) -> Message:
    records: dict[str, Any] = {}
    if arrays is not None:
        records[P.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    for name, tensors in (extra or {}).items():
        records[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
    records[P.METRICS] = MetricRecord(metrics)
    msg = Message(RecordDict(records), reply_to=instruction(node))
    assert msg.metadata.src_node_id == node
    return msg


def client_metrics(pid: int, n: int) -> dict[str, Any]:
    return {
        P.NUM_EXAMPLES: n,
        P.PARTITION_ID: pid,
        P.EPSILON: 1.5 + pid,
        P.DELTA: 1.0 / n,
        P.SIGMA: 0.9 + pid / 10,
        P.SAMPLE_RATE: 0.25,
        P.STEPS: 4,
        P.TOTAL_STEPS: 4 * (pid + 1),
        P.ACC_BEFORE: 0.4,
        P.ACC_AFTER: 0.5,
    }


def good_updates(model: Model, seed: int = 0) -> list[Arrays]:
    rng = np.random.default_rng(seed)
    return [
        {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in model.initial.items()}
        for _ in WEIGHTS
    ]


def good_replies(model: Model) -> list[Message]:
    return [
        reply(100 + i, arrays, client_metrics(i, w))
        for i, (arrays, w) in enumerate(zip(good_updates(model), WEIGHTS, strict=True))
    ]


def by_hand(updates: list[Arrays], weights: tuple[int, ...]) -> Arrays:
    total = float(sum(weights))
    out = {}
    for k in updates[0]:
        acc = np.zeros(updates[0][k].shape, dtype=np.float64)
        for arrays, w in zip(updates, weights, strict=True):
            acc += w * arrays[k].astype(np.float64)
        out[k] = acc / total
    return out


# --- weighted_average -----------------------------------------------------------------------------
def test_weighted_average_small_example_by_hand() -> None:
    f32 = np.float32
    a = {"x": np.array([1.0, 2.0], f32), "y": np.array([[4.0]], f32), "z": np.ones(1, f32)}
    b = {"x": np.array([3.0, -2.0], f32), "y": np.array([[0.0]], f32), "z": np.ones(1, f32)}
    out = weighted_average([(a, 1.0), (b, 3.0)], ["x", "y"])
    assert sorted(out) == ["x", "y"]  # only the named tensors
    np.testing.assert_array_equal(out["x"], np.array([2.5, -1.0], np.float32))
    np.testing.assert_array_equal(out["y"], np.array([[1.0]], np.float32))
    assert out["x"].dtype == np.float32 and out["y"].shape == (1, 1)


def test_weighted_average_of_one_is_identity_and_weights_are_relative() -> None:
    rng = np.random.default_rng(1)
    a = {"x": rng.normal(size=(3, 4)).astype(np.float32)}
    b = {"x": rng.normal(size=(3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(weighted_average([(a, 7.0)], ["x"])["x"], a["x"])
    np.testing.assert_allclose(
        weighted_average([(a, 1.0), (b, 1.0)], ["x"])["x"],
        weighted_average([(a, 50.0), (b, 50.0)], ["x"])["x"],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        weighted_average([(a, 1.0), (b, 1.0)], ["x"])["x"], (a["x"] + b["x"]) / 2, rtol=1e-6, atol=1e-7
    )


# --- aggregation of good replies ------------------------------------------------------------------
def test_good_replies_are_averaged_by_hand(
    model: Model, tmp_path: Path, task_identity: None, flwr_log: pytest.LogCaptureFixture
) -> None:
    strategy = make_strategy(model, tmp_path)
    arrays, metrics = strategy.aggregate_train(1, good_replies(model))
    assert arrays is not None and metrics is not None
    got = from_record(arrays)
    expected = by_hand(good_updates(model), WEIGHTS)
    assert sorted(got) == model.shared
    for k in model.shared:
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7)
    # the weights matter: a plain mean is different
    plain = by_hand(good_updates(model), (1, 1, 1))
    assert not np.allclose(got[model.shared[0]], plain[model.shared[0]], rtol=1e-5, atol=1e-7)
    assert metrics["accepted"] == 3 and metrics["rejected"] == 0 and metrics["refused"] == 0
    assert metrics["epsilon-max"] == pytest.approx(3.5)
    # the strategy moved on, and round 1 is checkpointed with the new tensors
    for k in model.shared:
        np.testing.assert_array_equal(strategy.current[k], got[k])
    ckpt = checkpoint.load(tmp_path / "checkpoint")
    assert ckpt is not None and ckpt.server_round == 1
    for k in model.shared:
        np.testing.assert_array_equal(ckpt.arrays[k], got[k])
    assert "aggregating 3 valid replies" in flwr_log.text


def test_server_lr_and_momentum_step_from_the_weighted_average_and_are_checkpointed(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    strategy = make_strategy(model, tmp_path, server_opt=ServerOptimizer(lr=2.0, momentum=0.9))
    arrays, _ = strategy.aggregate_train(1, good_replies(model))
    assert arrays is not None
    got, avg = from_record(arrays), by_hand(good_updates(model), WEIGHTS)
    for k in model.shared:  # x + 2 (avg - x): twice FedAvg's step
        x = model.initial[k].astype(np.float64)
        np.testing.assert_allclose(got[k], x + 2.0 * (avg[k] - x), rtol=1e-5, atol=1e-6)
    ckpt = checkpoint.load(tmp_path / "checkpoint")
    assert ckpt is not None and sorted(ckpt.velocity) == model.shared
    for k in model.shared:
        np.testing.assert_array_equal(ckpt.arrays[k], got[k])
        np.testing.assert_allclose(ckpt.velocity[k], avg[k] - model.initial[k], rtol=1e-5, atol=1e-7)


def test_ledger_holds_exactly_what_clients_sent(model: Model, tmp_path: Path, task_identity: None) -> None:
    strategy = make_strategy(model, tmp_path)
    strategy.aggregate_train(1, good_replies(model))
    on_disk = json.loads((tmp_path / "ledger.json").read_text())["entries"]
    assert on_disk == strategy.ledger.entries
    assert len(on_disk) == 3
    for i, (entry, w) in enumerate(zip(on_disk, WEIGHTS, strict=True)):
        sent = client_metrics(i, w)
        assert entry["status"] == "accepted" and entry["round"] == 1
        assert entry["node_id"] == 100 + i and entry["client"] == 100 + i  # a device = its node id
        for key in P.PRIVACY_KEYS:
            assert entry[key] == sent[key], key
        assert P.ACC_BEFORE not in entry  # the ledger is for privacy numbers only
    latest = Ledger(tmp_path / "ledger.json").latest_by_client()
    assert {c: e[P.EPSILON] for c, e in latest.items()} == {100: 1.5, 101: 2.5, 102: 3.5}


def test_devices_that_report_the_same_partition_stay_distinct_clients(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    """Three agents started without partition flags all report partition 0: three clients all the same."""
    same = [reply(100 + i, u, {**client_metrics(0, w), P.EPSILON: 1.5 + i}) for i, (u, w) in enumerate(
        zip(good_updates(model), WEIGHTS, strict=True))]  # fmt: skip
    deployed = make_strategy(model, tmp_path / "deployed")
    deployed.aggregate_train(1, same)
    deployed.aggregate_evaluate(1, [])
    assert {e["client"] for e in deployed.ledger.entries} == {100, 101, 102}
    assert sorted(deployed.recorder.clients) == [100, 101, 102]
    simulated = make_strategy(model, tmp_path / "simulated", client_key="partition")
    simulated.aggregate_train(1, good_replies(model))  # a simulation keys by partition: stable across runs
    assert [e["client"] for e in simulated.ledger.entries] == [0, 1, 2]


def test_a_reply_whose_step_count_goes_backwards_is_rejected_as_a_rollback(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    strategy = make_strategy(model, tmp_path)
    strategy.aggregate_train(1, good_replies(model))  # node 102 reports 12 steps in all
    strategy.aggregate_evaluate(1, [])
    moved = good_updates(model, seed=1)
    replies = [reply(100 + i, moved[i], {**client_metrics(i, w), P.TOTAL_STEPS: 4 * (i + 1) + 4})
               for i, w in enumerate(WEIGHTS)]  # fmt: skip
    replies[2] = reply(102, moved[2], {**client_metrics(2, WEIGHTS[2]), P.TOTAL_STEPS: 8})  # an older state
    arrays, summary = strategy.aggregate_train(2, replies)
    assert arrays is not None and summary is not None and summary["accepted"] == 2
    (entry,) = [e for e in strategy.ledger.entries if e["round"] == 2 and e["client"] == 102]
    assert entry["status"] == "rejected" and entry["reason"].startswith("state rolled back")
    expected = by_hand(moved[:2], WEIGHTS[:2])
    got = from_record(arrays)
    for k in model.shared:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7)


# --- bad replies ----------------------------------------------------------------------------------
BadCase = Callable[[Model, Arrays, dict[str, Any]], tuple[Arrays | None, dict[str, Any], dict[str, Arrays]]]


def _nan(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    a[m.shared[0]][0, 0] = np.nan
    return a, x, {}


def _inf(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    a[m.shared[1]][-1, -1] = -np.inf
    return a, x, {}


def _extra_key(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    a[m.shared[0].replace(".query.", ".key.")] = np.zeros((8, 64), np.float32)  # a LoRA that does not exist
    return a, x, {}


def _missing_key(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    del a[m.shared[-1]]
    return a, x, {}


def _wrong_shape(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    a[m.shared[0]] = np.zeros((4, 64), np.float32)
    return a, x, {}


def _int_dtype(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    a[m.shared[0]] = np.zeros(m.shapes[m.shared[0]], np.int32)
    return a, x, {}


def _huge_update(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    delta = {k: a[k].astype(np.float64) - m.initial[k] for k in a}
    norm = np.sqrt(sum(float(np.sum(d**2)) for d in delta.values()))
    scale = 1e6 * m.cfg.fed.max_update_norm / norm
    return {k: (m.initial[k] + scale * d).astype(np.float32) for k, d in delta.items()}, x, {}


def _zero_examples(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    return a, {**x, P.NUM_EXAMPLES: 0}, {}


def _negative_examples(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    return a, {**x, P.NUM_EXAMPLES: -20}, {}


def _nan_examples(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    return a, {**x, P.NUM_EXAMPLES: float("nan")}, {}


def _no_examples(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    return a, {k: v for k, v in x.items() if k != P.NUM_EXAMPLES}, {}


def _no_arrays(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    return None, x, {}


def _personal_key(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    return {**a, "head.weight": m.head["head.weight"]}, x, {}


def _personal_and_nan(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    a[m.shared[0]][0, 0] = np.nan  # the privacy check comes first: the leak is what gets reported
    return {**a, "head.bias": m.head["head.bias"]}, x, {}


def _second_record(m: Model, a: Arrays, x: dict[str, Any]) -> Any:
    return a, x, {"extra": {"body.extra": np.zeros(3, np.float32)}}


BAD: dict[str, tuple[BadCase, str]] = {
    "nan": (_nan, "NaN"),
    "inf": (_inf, "infinite"),
    "extra-key": (_extra_key, "unexpected ['body.base_model.model.layers.0.attention.self.key.lora_A"),
    "missing-key": (_missing_key, "missing ['body.base_model.model.layers.0.attention.self.value.lora_B"),
    "wrong-shape": (_wrong_shape, "has shape (4, 64), expected (8, 64)"),
    "int-dtype": (_int_dtype, "dtype int32"),
    "huge-update": (_huge_update, "exceeds fed.max-update-norm"),
    "zero-examples": (_zero_examples, "no positive 'num-examples'"),
    "negative-examples": (_negative_examples, "no positive 'num-examples'"),
    "nan-examples": (_nan_examples, "no positive 'num-examples'"),
    "no-examples": (_no_examples, "no positive 'num-examples'"),
    "no-arrays": (_no_arrays, "exactly one ArrayRecord"),
    "second-record": (_second_record, "exactly one ArrayRecord"),
    "personal-key": (_personal_key, "privacy violation: reply carries personal tensors ['head.weight']"),
    "personal-and-nan": (_personal_and_nan, "privacy violation: reply carries personal tensors ['head.bias"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_reply_is_dropped_with_reason_and_leaves_the_aggregate_unchanged(
    model: Model, tmp_path: Path, task_identity: None, flwr_log: pytest.LogCaptureFixture, case: str
) -> None:
    make_bad, reason = BAD[case]
    rng = np.random.default_rng(5)
    base = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in model.initial.items()}
    arrays, metrics, extra = make_bad(model, base, client_metrics(7, 40))
    bad = reply(666, arrays, metrics, extra)

    clean = make_strategy(model, tmp_path / "clean")
    expected, _ = clean.aggregate_train(1, good_replies(model))
    strategy = make_strategy(model, tmp_path / "mixed")
    good = good_replies(model)
    got, summary = strategy.aggregate_train(1, [good[0], bad, good[1], good[2]])

    assert got is not None and expected is not None and summary is not None
    got_arrays, expected_arrays = from_record(got), from_record(expected)
    assert sorted(got_arrays) == model.shared
    for k in model.shared:
        np.testing.assert_array_equal(got_arrays[k], expected_arrays[k])
    assert summary["accepted"] == 3 and summary["rejected"] == 1

    rejected = [e for e in strategy.ledger.entries if e["status"] != "accepted"]
    assert len(rejected) == 1
    entry = rejected[0]
    assert entry["status"] == "rejected" and entry["node_id"] == 666 and entry["round"] == 1
    assert reason in entry["reason"], entry["reason"]
    assert entry["reason"].startswith("privacy violation") == case.startswith("personal")
    assert entry[P.EPSILON] == metrics[P.EPSILON]  # what a dropped client spent is still on record
    warnings = {r.getMessage() for r in flwr_log.records if r.levelno == logging.WARNING}
    warnings = [w for w in warnings if "node 666" in w]
    assert len(warnings) == 1, warnings
    assert reason.removeprefix("privacy violation: ") in warnings[0]
    if case.startswith("personal"):
        assert "PRIVACY VIOLATION" in warnings[0]
    # the reason also lands in the round's line of metrics.jsonl
    strategy.aggregate_evaluate(1, [])
    line = json.loads((tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["rejected"] == 1
    assert line["rejections"] == [f"node 666: {entry['reason']}"]


def test_personal_tensor_in_any_record_is_reported_as_privacy_violation(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    strategy = make_strategy(model, tmp_path)
    bad = reply(666, good_updates(model)[0], client_metrics(7, 40), {"personal": dict(model.head)})
    good = good_replies(model)
    arrays, _ = strategy.aggregate_train(1, [*good, bad])
    assert arrays is not None  # the leaked tensors are dropped either way
    entry = strategy.ledger.entries[-1]
    assert entry["status"] == "rejected" and entry["node_id"] == 666
    assert entry["reason"].startswith("privacy violation"), entry["reason"]


def test_all_bad_replies_keep_the_current_tensors(model: Model, tmp_path: Path, task_identity: None) -> None:
    strategy = make_strategy(model, tmp_path)
    before = {k: v.copy() for k, v in strategy.current.items()}
    bads = []
    for i, case in enumerate(("nan", "personal-key", "huge-update")):
        base = {k: v.copy() + 0.01 for k, v in model.initial.items()}
        arrays, metrics, extra = BAD[case][0](model, base, client_metrics(i, 20))
        bads.append(reply(200 + i, arrays, metrics, extra))
    refused = Message(Error(code=4001, reason="PrivacyBudgetExhausted: no budget"), reply_to=instruction(300))
    arrays, summary = strategy.aggregate_train(1, [*bads, refused])
    assert arrays is None
    assert summary is not None
    assert (summary["accepted"], summary["rejected"], summary["refused"]) == (0, 3, 1)
    assert sorted(strategy.current) == sorted(before)
    for k in before:
        np.testing.assert_array_equal(strategy.current[k], before[k])
    ckpt = checkpoint.load(tmp_path / "checkpoint")  # the round is still checkpointed, with the old tensors
    assert ckpt is not None and ckpt.server_round == 1
    for k in before:
        np.testing.assert_array_equal(ckpt.arrays[k], before[k])
    assert [e["status"] for e in strategy.ledger.entries] == ["rejected", "rejected", "rejected", "refused"]


def test_error_replies_are_recorded_as_refused(model: Model, tmp_path: Path, task_identity: None) -> None:
    strategy = make_strategy(model, tmp_path)
    reason = "PrivacyBudgetExhausted: privacy budget exhausted: ε=8.000 now"
    refused = Message(Error(code=4001, reason=reason), reply_to=instruction(300))
    assert refused.has_error() and refused.metadata.src_node_id == 300
    good = good_replies(model)
    arrays, summary = strategy.aggregate_train(1, [good[0], refused, good[1], good[2]])
    assert arrays is not None and summary is not None
    got = from_record(arrays)
    expected = by_hand(good_updates(model), WEIGHTS)
    for k in model.shared:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7)
    assert summary["refused"] == 1 and summary["accepted"] == 3
    entry = [e for e in strategy.ledger.entries if e["node_id"] == 300]
    assert entry == [{"round": 1, "node_id": 300, "client": 300, "status": "refused", "reason": reason}]
    strategy.aggregate_evaluate(1, [])
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["refusals"] == [f"node 300: {reason}"]


def test_round_offset_numbers_the_ledger_and_checkpoint(
    model: Model, tmp_path: Path, task_identity: None
) -> None:
    strategy = make_strategy(model, tmp_path, round_offset=2)
    strategy.aggregate_train(1, good_replies(model))
    assert {e["round"] for e in strategy.ledger.entries} == {3}
    ckpt = checkpoint.load(tmp_path / "checkpoint")
    assert ckpt is not None and ckpt.server_round == 3
    strategy.aggregate_evaluate(1, [])
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["round"] == 3


# --- validate_reply directly ----------------------------------------------------------------------
def test_update_norm_bound_is_inclusive_and_zero_disables_it(model: Model) -> None:
    arrays = {k: v + 0.5 for k, v in model.initial.items()}
    norm = float(np.sqrt(sum(np.sum((arrays[k].astype(np.float64) - model.initial[k]) ** 2) for k in arrays)))
    metrics = {P.NUM_EXAMPLES: 5}
    kw = {"expected": model.shapes, "personal": set(model.personal), "current": model.initial}
    assert validate_reply(arrays, metrics, max_update_norm=norm * 1.001, **kw) == pytest.approx(norm)
    assert validate_reply(arrays, metrics, max_update_norm=0.0, **kw) == pytest.approx(norm)
    with pytest.raises(ParameterError, match="exceeds fed.max-update-norm"):
        validate_reply(arrays, metrics, max_update_norm=norm * 0.999, **kw)
    with pytest.raises(PrivacyViolation):
        validate_reply({**arrays, **model.head}, metrics, max_update_norm=0.0, **kw)


# --- the whole server loop in-process (real ClientApp, no Ray) ------------------------------------
def test_fraction_evaluate_zero_writes_one_metrics_line_per_round(
    tmp_path: Path, task_identity: None
) -> None:
    overrides = {
        **TINY,
        "fed.num-rounds": 1,
        "fed.fraction-evaluate": 0.0,
        "dp.noise-multiplier": 1.0,
        "train.threads": 1,
        "output.run-dir": str(tmp_path),
    }
    grid = LocalGrid(make_client_app(overrides), 2)
    run_federation(Config.from_run_config(overrides), grid, 7)
    assert len(grid.replies) == 2 and all(r.has_content() for r in grid.replies)  # it trained, no evaluation
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1], lines
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1
