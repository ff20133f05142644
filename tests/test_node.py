"""Client-side work happens only where it is needed."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY_TRAIN

from client.node import NodeInfo, run_evaluate, run_train
from common import features
from common import protocol as P
from common.config import Config
from common.params import get_arrays
from common.split import split_names
from common.tasks import get_backbone


def _shared(cfg: Config) -> dict:
    template = get_backbone(cfg).template
    return get_arrays(template, split_names([n for n, _ in template.named_parameters()], "fedper")["shared"])


def test_evaluate_encodes_only_the_test_split(tmp_path: Path) -> None:
    cfg = Config.from_run_config(TINY_TRAIN)
    features._CACHE.clear()
    run_evaluate(cfg, NodeInfo(0, 4, tmp_path, run_id=1), _shared(cfg), final_round=False)
    assert len(features._CACHE) == 1


def test_train_reports_its_training_time(tmp_path: Path) -> None:
    cfg = Config.from_run_config(TINY_TRAIN)
    _, metrics = run_train(cfg, NodeInfo(0, 4, tmp_path, run_id=1), _shared(cfg), 1)
    assert metrics[P.TRAIN_SECONDS] > 0
    assert len(features._CACHE) >= 2


def test_before_after_accuracy_can_be_switched_off(tmp_path: Path, monkeypatch) -> None:
    from common.tasks.classify import ClassifyTask

    calls: list[int] = []
    real = ClassifyTask.evaluate
    monkeypatch.setattr(ClassifyTask, "evaluate", lambda self, m, f: calls.append(1) or real(self, m, f))
    cfg = Config.from_run_config(TINY_TRAIN)
    _, on = run_train(cfg, NodeInfo(0, 4, tmp_path / "on", run_id=1), _shared(cfg), 1)
    assert P.ACC_BEFORE in on and P.ACC_AFTER in on and len(calls) == 2
    cfg = Config.from_run_config({**TINY_TRAIN, "client.report-before-after": False})
    _, off = run_train(cfg, NodeInfo(0, 4, tmp_path / "off", run_id=1), _shared(cfg), 1)
    assert P.ACC_BEFORE not in off and P.ACC_AFTER not in off and len(calls) == 2
    assert off[P.NUM_EXAMPLES] == on[P.NUM_EXAMPLES] and P.EPSILON in off
