"""Bring-your-own free text for the generative assistant: task.dataset = "text-file" (text, user, prompt)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import Config
from common.data import load_client_data
from common.errors import ConfigError, DataError
from simulations.sequential import run_sequential

LINES = [
    *(
        {"user": "alice", "prompt": f"How was day {i}?", "text": f"Grand, truly grand, day {i}."}
        for i in range(8)
    ),
    *({"user": "bob", "prompt": f"Any news {i}?", "text": f"nope. nothing {i}."} for i in range(6)),
]


def _file(tmp_path: Path, rows: list[dict[str, Any]], name: str = "chats.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(path: Path, **extra: Any) -> Config:
    return Config.from_run_config(
        {
            "model.name": "tiny-lm",
            "model.frozen-layers": 1,
            "lora.target-modules": "q_proj,v_proj",
            "task.dataset": "text-file",
            "task.data-path": str(path),
            "task.train-size": 6,
            "task.test-size": 2,
            "task.max-length": 24,
            "train.batch-size": 3,
            "train.threads": 1,
            "fed.num-rounds": 1,
            "client.report-before-after": False,
            **extra,
        }
    )


def test_each_user_gets_their_own_texts_and_prompts(tmp_path: Path) -> None:
    path = _file(tmp_path, LINES)
    chat = load_client_data(_cfg(path, **{"task.lm-format": "chat"}).task, 0, 2)
    assert chat.user == "alice" and len(chat.train_texts) + len(chat.test_texts) == 8
    for prompts, texts in ((chat.train_prompts, chat.train_texts), (chat.test_prompts, chat.test_texts)):
        assert all(
            p.split()[-1].rstrip("?") == t.split()[-1].rstrip(".")
            for p, t in zip(prompts, texts, strict=True)
        )
    assert not set(chat.train_texts) & set(chat.test_texts)
    plain = load_client_data(_cfg(path).task, 0, 2)
    assert plain.train_texts == chat.train_texts and plain.train_prompts == ()
    assert load_client_data(_cfg(path).task, 1, 2).user == "bob"


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"user": "a", "text": "hi"}] * 3, {"task.lm-format": "chat"}, "no prompt column"),
        ([{"text": "hi"}] * 3, {}, "lacks field"),
        ([{"user": "a", "text": "hi"}], {}, "need 2 to split"),
        ([{"user": "a", "text": 3}] * 3, {}, "text must be a string"),
    ],
)
def test_bad_text_files_fail_clearly(
    tmp_path: Path, rows: list[dict[str, Any]], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        load_client_data(_cfg(_file(tmp_path, rows), **extra).task, 0, 1)


def test_a_csv_without_the_user_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,prompt\nhello,hi\n", encoding="utf-8")
    with pytest.raises(DataError, match="lacks column.*'user'"):
        load_client_data(_cfg(path).task, 0, 1)
    with pytest.raises(ConfigError, match="does not fit task.dataset"):
        Config.from_run_config({"task.dataset": "text-file"})  # the classifier cannot read free text


def test_a_federation_personalizes_on_a_text_file(tmp_path: Path) -> None:
    path = _file(tmp_path, LINES)
    over = {k: v for k, v in _cfg(path, **{"task.lm-format": "chat"}).to_run_config().items()}
    summary = run_sequential({**over, "dp.noise-multiplier": 1.0}, 2, tmp_path / "run")
    assert [c["client"] for c in summary["clients"]] == [0, 1]
    assert all(c["ppl"] > 1.0 for c in summary["clients"]) and summary["perplexity-mean"] > 1.0
    assert 0.0 < summary["epsilon-max"] < float("inf")
