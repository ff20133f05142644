"""``fedpers chat`` / ``fedpers generate`` as a user runs them: bad arguments, a wrong key, chat memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_causal_lm import LM

from client.generate import Conversation
from common.chat_format import chat_prompt
from common.config import Config
from common.tasks import get_backbone

BIN = Path(sys.executable).parent
ENV = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in ENV.items() if k != "FEDPERS_STATE_KEY"}
    argv = [str(BIN / "fedpers"), *args]
    return subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True, timeout=120)


BAD = [
    (["generate", ""], "the prompt is empty"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "hi", "--examples", "-5"], "--examples must be -1"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "hi", "--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["generate", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "hi", "--chat", "--contrast", "-1"], "--contrast must be a finite number >= 0"),
    (["generate", "hi", "--contrast", "1"], "add --chat"),
    (["chat", "--examples", "-2"], "--examples must be -1"),
    (["chat", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
    (["chat", "--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["chat", "--contrast", "1", "--examples", "0"], "not --examples 0"),
    (["chat", "--device", "tpu"], "device 'tpu' is not one of"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2_before_any_state_is_read(
    tmp_path: Path, args: list[str], message: str
) -> None:
    # The state folder does not exist: had the model load started, the error would be about the state.
    res = _cli(*args, "--state-dir", str(tmp_path / "missing"), stdin="hi\n")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert not (tmp_path / "missing").exists()


@pytest.fixture(scope="module")
def chat_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-LM chat user's state after a 1-round sequential run (2 kept turns)."""
    from simulations.sequential import run_sequential

    out = tmp_path_factory.mktemp("chat")
    over = {**LM, "task.lm-format": "chat", "client.chat-examples": 2, "dp.enabled": False}
    run_sequential(over, 2, out)
    return out / "clients" / "client-0000"


def test_a_wrong_key_says_the_key_does_not_open_the_state(chat_state: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(bytes(range(32)))
    res = _cli("generate", "hail", "--state-dir", str(chat_state), "--key-file", str(wrong))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: the state key does not open {chat_state / 'personal.state'} (wrong --key-file or "
        "$FEDPERS_STATE_KEY), or the file was altered"
    ]
    assert "refusing to train" not in res.stderr


def test_chat_skips_an_empty_line_and_remembers_the_session(
    chat_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty line prints a hint and goes on; the second message sees the first exchange."""
    from typer.testing import CliRunner

    import client.generate
    from cli.main import app

    calls: list[dict[str, Any]] = []
    real = client.generate.stream

    def spy(backbone: Any, model: Any, prompt: str, **kw: Any) -> Any:
        calls.append({"prompt": prompt, **kw})
        return real(backbone, model, prompt, **kw)

    monkeypatch.setattr(client.generate, "stream", spy)
    args = ["chat", "--state-dir", str(chat_state), "--max-new-tokens", "4", "--temperature", "0"]
    res = CliRunner().invoke(app, args, input="hail\n\nwho art thou\n")
    assert res.exit_code == 0, res.output
    assert "End with exit, quit or Ctrl-D" in res.stderr and "earlier messages" in res.stderr
    assert "type exit or quit, or press Ctrl-D" in res.stderr
    answers = [line.removeprefix("> ") for line in res.stdout.splitlines()]
    assert [c["prompt"] for c in calls] == ["hail", "who art thou"]
    assert calls[0]["history"] == [] and calls[1]["history"] == [("hail", answers[0])]
    assert len(calls[1]["examples"]) == 2  # the user's kept turns still come first
    res = CliRunner().invoke(app, args, input="hail\nquit\nnever read\n")
    assert res.exit_code == 0 and calls[-1]["prompt"] == "hail" and len(calls) == 3


def test_the_conversation_drops_the_oldest_turns_to_fit_the_context() -> None:
    tok = get_backbone(Config.from_run_config(LM)).tokenizer
    turns = [(f"message number {i}", f"answer number {i} " * 3) for i in range(6)]

    def size(history: list[tuple[str, str]]) -> int:
        return len(tok(chat_prompt(tok, "and now", history), add_special_tokens=False)["input_ids"])

    room = size(turns[-3:]) + 5  # the last three turns fit with 5 new tokens; the last four do not
    assert size(turns[-4:]) > room - 5
    memory = Conversation(room, list(turns))
    assert memory.fitting(tok, "and now", [], 5) == turns[-3:]
    assert Conversation(10_000, list(turns)).fitting(tok, "and now", [], 5) == turns
    assert Conversation(3, list(turns)).fitting(tok, "and now", [], 5) == []
