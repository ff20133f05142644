"""``fedpers chat`` / ``fedpers generate``: the commands, their arguments checked before any model loads.

Loading the personal model takes seconds (minutes for a large backbone on a slow disk), so a bad argument
must be refused first, in one line, not after the load or deep inside generation.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import typer

from cli.output import console, fail
from common.errors import ConfigError, FedpersError

END_WORDS = ("exit", "quit")
EMPTY_LINE_HINT = "(empty message skipped; type exit or quit, or press Ctrl-D, to end the chat)"


def check_options(
    *,
    prompt: str | None,
    examples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    contrast: float,
    device: str,
    chat: bool,
) -> None:
    """Raise ConfigError for the first bad chat/generate argument (``prompt`` None: chat reads stdin)."""
    if prompt is not None and not prompt.strip():
        raise ConfigError("the prompt is empty: give a text to continue (or, with --chat, to answer)")
    if examples < -1:
        raise ConfigError(f"--examples must be -1 (the state's choice), 0 (none) or a count, got {examples}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (0 < top_p <= 1):  # also refuses nan
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    _check_contrast(contrast, examples, chat)
    from common.device import resolve_device  # imports torch, still far cheaper than the model

    resolve_device(device)


def _check_contrast(contrast: float, examples: int, chat: bool) -> None:
    """--contrast is a finite a >= 0, and a > 0 needs the user's turns (the chat format, examples != 0)."""
    if not math.isfinite(contrast) or contrast < 0:
        raise ConfigError(f"--contrast must be a finite number >= 0 (0 = off), got {contrast}")
    if contrast > 0 and not chat:
        raise ConfigError("--contrast amplifies the user's turns, which only the chat format has: add --chat")
    if contrast > 0 and examples == 0:
        raise ConfigError(
            "--contrast amplifies the user's turns: it needs turns before the message, not --examples 0"
        )


def banner(state_dir: Path, context: int) -> str:
    """What chat says when it starts: whose assistant, what it remembers, how to end."""
    from client.state_dir import user_of

    user = user_of(Path(state_dir))
    whose = f"{state_dir} (user {user})" if user else str(state_dir)
    return (
        f"chat with the assistant of {whose}: one line per message. Each answer sees this session's "
        f"earlier messages and answers (the oldest dropped past the model's {context}-token context); "
        "nothing is kept after the session. End with exit, quit or Ctrl-D."
    )


def _assistant(state_dir: Path, key_file: Path | None, examples: int, device: str) -> tuple[Any, Any, Any]:
    """(backbone, model, ChatTurns): the state's turns, at most ``examples`` per message (-1 = its own)."""
    from client.generate import load_chat

    try:
        backbone, model, turns = load_chat(state_dir, key_file, device)
        return backbone, model, turns.limit(examples)
    except FedpersError as exc:
        fail(exc)
        raise  # unreachable: fail exits


_EXAMPLES_HELP = (
    "how many of this user's own turns (kept in the state) come first as context; 0 = none; -1 = the "
    "state's choice (all it keeps, or with client.chat-pick = retrieve client.chat-examples turns "
    "retrieved per message)"
)
_CONTRAST_HELP = (
    "amplify what the user's own turns change: each token from (1 + a) x logits with the turns - a x "
    "logits without them (a second model pass per token); 0 = off"
)
_DEVICE_HELP = "auto (CUDA, then Apple MPS, then the CPU) | cpu | cuda | cuda:N | mps"


def _say(backbone: object, model: object, prompt: str, chat: bool, opts: dict) -> str:
    """Stream the answer to ``prompt`` to stdout; return its text."""
    from client.generate import stream

    pieces = []
    try:
        for piece in stream(backbone, model, prompt, chat=chat, **opts):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
    except FedpersError as exc:
        fail(exc)
    sys.stdout.write("\n")
    return "".join(pieces)


def _check_assistant(prompt: str | None, chat: bool, options: dict[str, Any]) -> None:
    """Every chat/generate argument checked before the model loads (one line, exit 2)."""
    try:
        check_options(prompt=prompt, chat=chat, **options)
    except FedpersError as exc:
        fail(exc)


def generate(
    prompt: str = typer.Argument(..., help="the text to continue (or, with --chat, to answer)"),
    state_dir: Path = typer.Option(..., help="the client's state folder"),
    key_file: Path = typer.Option(None, help="state key file (default: <state-dir>/state.key)"),
    chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
    max_new_tokens: int = typer.Option(80, help="most tokens to generate"),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_p: float = typer.Option(0.9, help="nucleus sampling mass"),
    seed: int = typer.Option(None, help="sampling seed (default: random)"),
    examples: int = typer.Option(-1, help=_EXAMPLES_HELP + " (with --chat)"),
    contrast: float = typer.Option(0.0, help=_CONTRAST_HELP + " (with --chat)"),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
) -> None:
    """Continue a text offline with this user's personal assistant, streaming tokens."""
    checks = {"examples": examples, "max_new_tokens": max_new_tokens, "temperature": temperature}
    _check_assistant(prompt, chat, {**checks, "top_p": top_p, "contrast": contrast, "device": device})
    backbone, model, turns = _assistant(state_dir, key_file, examples if chat else 0, device)
    opts = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    opts["contrast"] = contrast
    _say(backbone, model, prompt, chat, {**opts, "examples": turns.for_message(prompt)})


def chat(
    state_dir: Path = typer.Option(..., help="the client's state folder"),
    key_file: Path = typer.Option(None, help="state key file (default: <state-dir>/state.key)"),
    max_new_tokens: int = typer.Option(80, help="most tokens per answer"),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_p: float = typer.Option(0.9, help="nucleus sampling mass"),
    seed: int = typer.Option(None, help="sampling seed (default: random)"),
    examples: int = typer.Option(-1, help=_EXAMPLES_HELP),
    contrast: float = typer.Option(0.0, help=_CONTRAST_HELP),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
) -> None:
    """Chat offline with this user's personal assistant: one line per message, remembered for the session.

    Each answer sees this session's earlier messages and answers (the oldest dropped past the model's
    context). exit, quit or EOF (Ctrl-D) ends; an empty line is skipped.
    """
    from client.generate import Conversation, context_size

    checks = {"examples": examples, "max_new_tokens": max_new_tokens, "temperature": temperature}
    _check_assistant(None, True, {**checks, "top_p": top_p, "contrast": contrast, "device": device})
    backbone, model, turns = _assistant(state_dir, key_file, examples, device)
    opts: dict[str, object] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    opts["seed"], opts["contrast"] = seed, contrast
    memory = Conversation(context_size(backbone))
    console.print(banner(state_dir, memory.context), soft_wrap=True)
    for line in sys.stdin:
        prompt = line.strip()
        if prompt in END_WORDS:
            break
        if not prompt:
            console.print(EMPTY_LINE_HINT, soft_wrap=True)
            continue
        sys.stdout.write("> ")
        kept = turns.for_message(prompt)
        history = memory.fitting(backbone.tokenizer, prompt, kept, max_new_tokens)
        answer = _say(backbone, model, prompt, True, {**opts, "examples": kept, "history": history})
        memory.add(prompt, answer)


def register(app: typer.Typer) -> None:
    """Add ``generate`` and ``chat`` to ``app``."""
    app.command()(generate)
    app.command()(chat)
