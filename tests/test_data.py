"""Tests of common.data: tweets (Dirichlet), news (per-user interests), user files, errors, baseline."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import data
from common.assets import ensure
from common.config import Config, TaskConfig
from common.data import ClientData, label_names, load_client_data, majority_baseline_accuracy
from common.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def _task(**changes: object) -> TaskConfig:
    return dataclasses.replace(Config.from_run_config({}).task, **changes)


@pytest.fixture(scope="module")
def tweets_ready() -> Path:
    return ensure("tweets")


@pytest.fixture(scope="module")
def news_ready() -> Path:
    return ensure("news")


def _write_csv(path: Path, rows: list[tuple[object, ...]], header: str = "text,label,user") -> Path:
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _user_rows(users: dict[str, int]) -> list[tuple[object, ...]]:
    labels = ("neg", "pos", 1, 0)  # names and integer indices
    return [(f"{u} says thing {i}", labels[i % 4], u) for u, n in users.items() for i in range(n)]


# --- label names ------------------------------------------------------------------------------------------


def test_label_names() -> None:
    assert label_names(_task(dataset="tweets")) == ("negative", "neutral", "positive")
    assert label_names(_task(dataset="news")) == ("not-liked", "liked")
    assert label_names(_task(dataset="file", labels=" neg, pos ,")) == ("neg", "pos")
    with pytest.raises(ConfigError, match="task.labels must list the label names"):
        label_names(_task(dataset="file", labels=""))


# --- tweets -----------------------------------------------------------------------------------------------


def test_tweets_sizes_deterministic_and_disjoint(tweets_ready: Path) -> None:
    task = _task(dataset="tweets", train_size=40, test_size=20, dirichlet_alpha=0.3, seed=1)
    clients = [load_client_data(task, p, 5) for p in range(5)]
    for d in clients:
        assert (len(d.train_texts), len(d.test_texts)) == (40, 20)
        assert d.train_labels.dtype == np.int64 and d.label_names == data.TWEET_LABELS
    data._dirichlet.cache_clear()
    data._load_source.cache_clear()
    again = load_client_data(task, 3, 5)
    assert again.train_texts == clients[3].train_texts and again.test_texts == clients[3].test_texts
    assert np.array_equal(again.train_labels, clients[3].train_labels)
    # No example is used twice: not within a client (train/test), not across clients.
    used = [t for d in clients for t in d.train_texts + d.test_texts]
    assert len(used) == len(set(used)) == 5 * 60
    other_seed = load_client_data(_task(dataset="tweets", train_size=40, test_size=20, seed=2), 3, 5)
    assert other_seed.train_texts != clients[3].train_texts


def test_tweets_small_alpha_skews_labels(tweets_ready: Path) -> None:
    def mean_max_share(alpha: float) -> float:
        task = _task(dataset="tweets", train_size=60, test_size=20, dirichlet_alpha=alpha, seed=0)
        shares = [
            np.bincount(load_client_data(task, p, 10).train_labels, minlength=3).max() / 60 for p in range(10)
        ]
        return float(np.mean(shares))

    skewed, iid = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.75 and iid < 0.6 and skewed - iid > 0.2


def test_same_split_in_another_process(tweets_ready: Path) -> None:
    code = (
        "import dataclasses; from common.config import Config; from common.data import load_client_data\n"
        "t = dataclasses.replace(Config.from_run_config({}).task, train_size=30, test_size=10)\n"
        "d = load_client_data(t, 2, 4)\n"
        "print(repr((d.train_texts, d.test_texts, d.train_labels.tolist())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    d = load_client_data(_task(train_size=30, test_size=10), 2, 4)
    assert out.stdout.strip() == repr((d.train_texts, d.test_texts, d.train_labels.tolist()))


# --- news -------------------------------------------------------------------------------------------------


def test_news_same_article_different_labels(news_ready: Path) -> None:
    task = _task(dataset="news", train_size=800, test_size=200, topics_liked=2, seed=3)
    seen: dict[str, set[int]] = {}
    for p in range(4):
        d = load_client_data(task, p, 4)
        assert (len(d.train_texts), len(d.test_texts)) == (800, 200) and d.user == f"client-{p}"
        assert not set(d.train_texts) & set(d.test_texts)
        assert set(np.unique(d.train_labels)) == {0, 1}
        for text, label in zip(
            d.train_texts + d.test_texts, np.concatenate([d.train_labels, d.test_labels]), strict=True
        ):
            seen.setdefault(text, set()).add(int(label))
    assert sum(len(labels) == 2 for labels in seen.values()) > 50
    first = next(iter(seen))
    assert len(first.split(". ", 1)[0]) < 120 and len(first) < 800  # title + start of the body


# --- user files -------------------------------------------------------------------------------------------


def test_csv_natural_users(tmp_path: Path) -> None:
    f = _write_csv(tmp_path / "d.csv", _user_rows({"carol": 8, "alice": 6, "bob": 12}))
    task = _task(dataset="file", labels="neg,pos", train_size=5, test_size=2)
    d = load_client_data(task, 0, 3, data_path=str(f))  # users largest first: bob, carol, alice
    assert d.user == "bob" and (len(d.train_texts), len(d.test_texts)) == (5, 2)
    assert all(t.startswith("bob ") for t in d.train_texts + d.test_texts)
    assert not set(d.train_texts) & set(d.test_texts)
    small = load_client_data(task, 2, 3, data_path=str(f))  # alice: 6 < 7 -> proportional split
    assert small.user == "alice" and (len(small.train_texts), len(small.test_texts)) == (4, 2)
    with pytest.raises(DataError, match="the file has 3 users"):
        load_client_data(task, 3, 4, data_path=str(f))


def test_jsonl_natural_users_and_single_user(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        "\n".join(json.dumps({"text": t, "label": lab, "user": u}) for t, lab, u in _user_rows({"zed": 10}))
        + "\n\n",
        encoding="utf-8",
    )
    task = _task(dataset="file", labels="neg,pos", data_path=str(f), train_size=100, test_size=50)
    d = load_client_data(task, 0, 1)
    assert d.user == "zed" and len(d.train_texts) + len(d.test_texts) == 10 and len(d.test_texts) >= 1
    labels = {
        t: int(lab)
        for t, lab in zip(
            d.train_texts + d.test_texts, np.concatenate([d.train_labels, d.test_labels]), strict=True
        )
    }
    assert labels["zed says thing 0"] == 0 and labels["zed says thing 1"] == 1
    assert labels["zed says thing 2"] == 1 and labels["zed says thing 3"] == 0  # integer labels


def test_file_without_user_is_dirichlet_split(tmp_path: Path) -> None:
    rows = [(f"text number {i}", ("a", "b", "c")[i % 3]) for i in range(300)]
    f = _write_csv(tmp_path / "d.csv", rows, header="text,label")
    task = _task(dataset="file", labels="a,b,c", data_path=str(f), train_size=20, test_size=10, seed=5)
    clients = [load_client_data(task, p, 4) for p in range(4)]
    texts = [t for d in clients for t in d.train_texts + d.test_texts]
    assert len(texts) == len(set(texts)) and clients[2].user == "client-2"
    assert all(len(d.train_texts) <= 20 and 1 <= len(d.test_texts) <= 10 for d in clients)
    assert load_client_data(task, 0, 1).train_texts  # one partition is everything


def test_single_class_shard_trains_and_baseline_is_one(tmp_path: Path) -> None:
    f = _write_csv(tmp_path / "d.csv", [(f"t{i}", "pos", "u") for i in range(6)])
    d = load_client_data(_task(dataset="file", labels="neg,pos"), 0, 1, data_path=str(f))
    assert majority_baseline_accuracy(d) == 1.0


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("text,lab\nhi,neg\n", ".csv", r"lacks column\(s\) 'label'"),
        ("words,stuff\nhi,neg\n", ".csv", r"lacks column\(s\) 'text', 'label'"),
        ("text,label\nhi,neg\nho,meh\n", ".csv", r"line 3: unknown label 'meh'; allowed: neg, pos"),
        ("text,label\nhi,7\n", ".csv", r"unknown label '7'"),
        ('{"text": "a", "label": "neg"}\n{"text": "b"}\n', ".jsonl", r"line 2 lacks field\(s\) 'label'"),
        ('{"text": "a", "label": "neg"}\n{oops\n', ".jsonl", r"line 2 is not valid JSON"),
        ('["a", "neg"]\n', ".jsonl", "must be a JSON object"),
        ("text,label\n ,neg\n,pos\n", ".csv", r"has no examples \(2 rows with empty text skipped\)"),
        ("", ".csv", "is empty"),
        ("text,label\nhi,neg\n", ".txt", r"must end in \.csv, \.jsonl or \.json"),
    ],
)
def test_file_errors(tmp_path: Path, content: str, suffix: str, match: str) -> None:
    f = tmp_path / f"d{suffix}"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_client_data(_task(dataset="file", labels="neg,pos"), 0, 1, data_path=str(f))


def test_file_not_utf8_and_missing(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_bytes(b"text,label\nok,neg\ncaf\xe9,pos\n")
    task = _task(dataset="file", labels="neg,pos")
    with pytest.raises(DataError, match=r"d\.csv is not UTF-8 text \(line 3\)"):
        load_client_data(task, 0, 1, data_path=str(f))
    with pytest.raises(DataError, match=r"nope\.csv does not exist"):
        load_client_data(task, 0, 1, data_path=str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match="task.data-path must name"):
        load_client_data(task, 0, 1)


def test_empty_text_rows_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = _write_csv(
        tmp_path / "d.csv",
        [("a", "neg"), (" ", "neg"), ("b", "pos"), ("", "pos"), ("c", "pos")],
        header="text,label",
    )
    with caplog.at_level(logging.WARNING, logger="common.data"):
        d = load_client_data(_task(dataset="file", labels="neg,pos"), 0, 1, data_path=str(f))
    assert len(d.train_texts) + len(d.test_texts) == 3
    assert "skipped 2 rows with empty text" in caplog.text


def test_empty_and_tiny_shards(tmp_path: Path) -> None:
    task = _task(dataset="file", labels="neg,pos")
    f = _write_csv(tmp_path / "d.csv", [("a", "neg"), ("b", "pos")], header="text,label")
    with pytest.raises(DataError, match=r"client 2 has no examples in .*d\.csv"):
        load_client_data(task, 0, 3, data_path=str(f))
    g = _write_csv(tmp_path / "g.csv", [("a", "neg", "u1"), ("b", "pos", "u1"), ("c", "pos", "u2")])
    with pytest.raises(DataError, match="client 0 \\(u1\\) has only 2 examples.*fewer than 2 training"):
        load_client_data(task, 0, 2, data_path=str(g))
    with pytest.raises(ConfigError, match="partition_id 2 must be in"):
        load_client_data(task, 2, 2, data_path=str(g))


# --- baseline ---------------------------------------------------------------------------------------------


def test_majority_baseline() -> None:
    d = ClientData(
        ("a", "b", "c", "d"),
        np.array([2, 2, 0, 1]),
        ("e", "f", "g", "h", "i"),
        np.array([2, 0, 2, 2, 1]),
        ("x", "y", "z"),
        "u",
    )
    assert majority_baseline_accuracy(d) == pytest.approx(0.6)
    tie = dataclasses.replace(d, train_labels=np.array([1, 0, 0, 1]))
    assert majority_baseline_accuracy(tie) == pytest.approx(0.2)  # tie -> lowest label index (0)
    with pytest.raises(DataError, match="differ in length"):
        ClientData(("a",), np.array([0, 1]), (), np.array([]), ("x", "y"), "u")


def test_validation_split_is_held_out_of_train_and_never_touches_test(tweets_ready: Path) -> None:
    full = load_client_data(_task(train_size=50, test_size=20), 3, 10)
    val = load_client_data(_task(train_size=50, test_size=20, evaluate_on="validation"), 3, 10)
    assert len(val.train_texts) == 40 and len(val.test_texts) == 10
    assert val.train_texts + val.test_texts == full.train_texts  # validation = the tail of train
    assert not set(val.test_texts) & set(full.test_texts)


def test_validation_split_too_small_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label,user\na,neg,u\nb,pos,u\nc,neg,u\nd,pos,u\n")
    task = _task(dataset="file", labels="neg,pos", evaluate_on="validation", validation_fraction=0.5)
    with pytest.raises(DataError, match="validation split"):
        load_client_data(task, 0, 1, str(path))
