"""`fedpers recommend` ranks items by this user's personalized model, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY as CONFTEST_TINY
from typer.testing import CliRunner

from cli.main import app
from client.predict import predict
from client.recommend import read_items, recommend
from common.config import Config
from common.data import load_client_data
from common.errors import ConfigError
from simulations.sequential import run_sequential

NEWS = {**CONFTEST_TINY, "fed.num-rounds": 1, "task.dataset": "news"}


def test_recommend_ranks_by_the_users_own_liked_probability(tmp_path: Path) -> None:
    run_sequential(NEWS, 2, tmp_path)
    state = tmp_path / "clients" / "client-0001"
    items = list(load_client_data(Config.from_run_config(NEWS).task, 1, 2).test_texts[:12])
    liked = [p.probabilities["liked"] for p in predict(state, items)]
    ranked = recommend(state, items)
    assert [r.rank for r in ranked] == list(range(1, len(items) + 1))
    assert sorted(r.item for r in ranked) == sorted(items)
    assert [r.score for r in ranked] == sorted(liked, reverse=True)
    assert all(r.score == pytest.approx(liked[items.index(r.item)]) for r in ranked)
    assert recommend(state, items, top=3) == ranked[:3]
    low = recommend(state, items, label="not-liked")  # two labels: the other one ranks by 1 - p(liked)
    assert [r.score for r in low] == pytest.approx(sorted((1 - p for p in liked), reverse=True), abs=1e-6)
    # Another user's model ranks with its own head (the same shared adapters, another personal part).
    assert [r.score for r in recommend(tmp_path / "clients" / "client-0000", items)] != [
        r.score for r in ranked
    ]
    with pytest.raises(ConfigError, match="labels not-liked, liked: choose one with --label"):
        recommend(state, items, label="loved")
    with pytest.raises(ConfigError, match="at least one item"):
        recommend(state, [])
    with pytest.raises(ConfigError, match="top must be >= 0"):
        recommend(state, items, top=-1)
    path = tmp_path / "items.txt"
    path.write_text("\n".join(items[:5]) + "\n\n")
    assert read_items(path) == items[:5]
    res = CliRunner().invoke(
        app, ["recommend", "--state-dir", str(state), "--items", str(path), "--top", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "p(liked)" in res.output and " 1 " in res.output and " 3 " not in res.output
    res = CliRunner().invoke(app, ["recommend", "--state-dir", str(state), "--items", str(tmp_path / "none")])
    assert res.exit_code == 2 and "cannot read items" in res.output


def test_recommend_on_a_model_without_liked_needs_a_label(tmp_path: Path) -> None:
    tweets = {**CONFTEST_TINY, "fed.num-rounds": 1}
    run_sequential(tweets, 2, tmp_path)
    state = tmp_path / "clients" / "client-0000"
    with pytest.raises(ConfigError, match="default 'liked' is not one of them"):
        recommend(state, ["a fine day", "the train is late"])
    ranked = recommend(state, ["a fine day", "the train is late"], label="positive")
    assert len(ranked) == 2 and ranked[0].score >= ranked[1].score
