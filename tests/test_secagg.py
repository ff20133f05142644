"""SecAgg+ (Flower's protocol through fedpers' adapter): same aggregate as plain FedAvg, nothing readable
on the wire, dropouts survived, refusals and unsupported settings reported clearly.

Federations run in-process (LocalGrid: real ClientApps with Flower's secaggplus_mod, one persistent
Context per node as on a SuperNode); non-private so that two runs train identically and their
aggregates can be compared to the quantization error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY, LocalGrid
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.app import make_client_app
from common.config import Config
from common.errors import ConfigError
from common.params import get_arrays
from common.split import split_names
from common.tasks import get_backbone
from server import checkpoint
from server.app import run_federation

BASE: dict[str, Any] = {
    **TINY,
    "fed.num-rounds": 1,
    "dp.enabled": False,
    "train.threads": 1,
    "client.report-before-after": False,
}


def _run(tmp_path: Path, name: str, nodes: int, **over: Any) -> tuple[Path, LocalGrid]:
    drop = over.pop("drop", None)
    overrides = {**BASE, "fed.min-clients": min(nodes, 3), **over, "output.run-dir": str(tmp_path / name)}
    grid = LocalGrid(make_client_app(overrides), nodes, drop=drop)
    run_federation(Config.from_run_config(overrides), grid, 7)
    return tmp_path / name, grid


def _stage(msg: Message) -> str | None:
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(rec[Key.STAGE]) if rec is not None and Key.STAGE in rec else None


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    ckpt = checkpoint.load(run_dir / "checkpoint")
    assert ckpt is not None and ckpt.server_round == 1
    return ckpt.arrays


def _initial(cfg: Config) -> dict[str, np.ndarray]:
    template = get_backbone(cfg).template
    roles = split_names([n for n, _ in template.named_parameters()], cfg.personalization.mode)
    return get_arrays(template, roles["shared"])


def _assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= tol, worst


def test_secure_aggregate_equals_plain_fedavg_and_no_update_is_readable(
    tmp_path: Path, task_identity: None
) -> None:
    plain, _ = _run(tmp_path, "plain", 3)
    secure, grid = _run(tmp_path, "secagg", 3, **{"secagg.enabled": True})
    got, want = _final(secure), _final(plain)
    start = _initial(Config.from_run_config(BASE))
    assert max(float(np.abs(want[k] - start[k]).max()) for k in want) > 1e-3  # training moved them
    # quantization step 2·range / 2²² per client, weights exact to 2⁻²²: far below any real update
    _assert_close(got, want, tol=1e-5)
    collect = [
        r
        for r in grid.replies
        if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(collect) == 3
    for reply in collect:  # the masked vector replaces the update; no tensor travels in clear
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        assert isinstance(masked, list) and masked
        metrics = reply.content.config_records["fitres.metrics"]
        assert "update-norm" not in metrics and "epsilon" not in metrics  # non-private run: no ε
    ledger = json.loads((secure / "ledger.json").read_text())
    assert sum(e["status"] == "accepted" for e in ledger["entries"]) == 3
    lines = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["accepted"] == 3 and "eval-acc-mean" in lines[0]


def test_a_client_dropping_out_mid_round_is_unmasked_and_the_round_completes(
    tmp_path: Path, task_identity: None
) -> None:
    """5 clients, shares 3, threshold 2: the last client vanishes after the key exchange."""
    gone = 1004

    def drop(msg: Message) -> bool:
        return msg.metadata.dst_node_id == gone and _stage(msg) in (
            Stage.COLLECT_MASKED_VECTORS,
            Stage.UNMASK,
        )

    secure, _ = _run(tmp_path, "secagg", 5, drop=drop, **{"secagg.enabled": True})
    # plain FedAvg over the four that stayed (same partitions of a 5-way split, same seeds)
    plain, _ = _run(tmp_path, "plain", 5, drop=lambda m: m.metadata.dst_node_id == gone)
    _assert_close(_final(secure), _final(plain), tol=1e-5)
    line = json.loads((secure / "metrics.jsonl").read_text().splitlines()[0])
    assert line["accepted"] == 4


def test_budget_refusal_reaches_the_server_as_a_dropout(tmp_path: Path, task_identity: None) -> None:
    over = {"secagg.enabled": True, "dp.enabled": True, "dp.epsilon": 0.01, "dp.noise-multiplier": 0.5}
    run, grid = _run(tmp_path, "secagg", 3, **over)
    refusals = [r for r in grid.replies if r.has_error()]
    assert refusals and all("privacy budget exhausted" in str(r.error.reason) for r in refusals)
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert line["accepted"] == 0 and line["refused"] >= 1


@pytest.mark.parametrize(
    "over, message",
    [
        ({"secagg.num-shares": 4}, "must be odd"),
        ({"secagg.threshold": 3}, "below secagg.num-shares"),
        ({"fed.min-clients": 2}, "fed.min-clients = 2 is below secagg.num-shares = 3"),
        ({"dp.user-level": True}, "SecAgg+ hides"),
        ({"personalization.mode": "local"}, "shares no tensors"),
    ],
)
def test_settings_secagg_cannot_support_fail_up_front(
    tmp_path: Path, task_identity: None, over: dict[str, Any], message: str
) -> None:
    overrides = {**BASE, "fed.min-clients": 3, "secagg.enabled": True, **over}
    overrides["output.run-dir"] = str(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_federation(Config.from_run_config(overrides), LocalGrid(make_client_app(overrides), 3), 7)
