"""``fedpers chat`` / ``fedpers generate``: their arguments, checked before any model loads, and chat's words.

Loading the personal model takes seconds (minutes for a large backbone on a slow disk), so a bad argument
must be refused first, in one line, not after the load or deep inside generation.
"""

from __future__ import annotations

import math
from pathlib import Path

from common.errors import ConfigError

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
