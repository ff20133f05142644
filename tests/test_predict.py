"""`fedpers predict` rebuilds the personalized model from the encrypted state alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY as CONFTEST_TINY
from typer.testing import CliRunner

from cli.main import app
from client.predict import predict
from common.config import Config
from common.data import load_client_data
from common.errors import StateError
from simulations.sequential import run_sequential

TINY = {**CONFTEST_TINY, "fed.num-rounds": 1}


def test_predict_matches_the_clients_final_evaluation(tmp_path: Path) -> None:
    out = run_sequential(TINY, 2, tmp_path)
    data = load_client_data(Config.from_run_config(TINY).task, 1, 2)
    results = predict(tmp_path / "clients" / "client-0001", list(data.test_texts))
    assert [r.text for r in results] == list(data.test_texts)  # input order kept
    acc = np.mean([r.label == data.label_names[y] for r, y in zip(results, data.test_labels, strict=True)])
    final = {c["client"]: c["acc"] for c in out["clients"]}
    assert acc == pytest.approx(final[1])
    assert all(abs(sum(r.probabilities.values()) - 1) < 1e-5 for r in results)


def test_predict_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="is empty: no client state here"):
        predict(tmp_path, ["hello"])
    run_sequential(TINY, 2, tmp_path / "run")
    with pytest.raises(ValueError, match="at least one text"):
        predict(tmp_path / "run" / "clients" / "client-0000", [])
    state = str(tmp_path / "run" / "clients" / "client-0000")
    res = CliRunner().invoke(app, ["predict", "--state-dir", state, "so happy today", "worst day ever"])
    assert res.exit_code == 0, res.output
    assert "so happy today" in res.output
