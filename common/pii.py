"""Scrub personal identifiers from text before anything is trained on it (on the device).

Replaces e-mail addresses, URLs, phone numbers and @user handles with placeholder tokens, plus any extra
regular expressions the user configures. Deliberately conservative: a false positive costs a word, a
false negative leaks it into the training signal (which DP bounds, but only statistically).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from common.errors import ConfigError

BUILTIN: tuple[tuple[str, str], ...] = (
    ("[EMAIL]", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    ("[URL]", r"(?:https?://|www\.)\S+"),
    ("[PHONE]", r"(?<!\w)\+?\d[\d\s().-]{7,}\d(?!\w)"),
    ("[USER]", r"(?<![\w@])@\w{1,30}"),
)


@lru_cache(maxsize=32)
def _compiled(extra: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    rules = [(token, re.compile(pattern)) for token, pattern in BUILTIN]
    for pattern in extra:
        try:
            rules.append(("[PII]", re.compile(pattern)))
        except re.error as exc:
            raise ConfigError(
                f"task.pii-patterns: {pattern!r} is not a valid regular expression ({exc})"
            ) from exc
    return tuple(rules)


def check_patterns(spec: str) -> None:
    """Raise ConfigError naming the first pattern of ``task.pii-patterns`` that does not compile."""
    _compiled(parse_patterns(spec))


def parse_patterns(spec: str) -> tuple[str, ...]:
    """Extra patterns from the config string: one regular expression per line."""
    return tuple(line.strip() for line in spec.splitlines() if line.strip())


def scrub(text: str, extra: Sequence[str] = ()) -> str:
    """``text`` with e-mails, URLs, phone numbers, handles and ``extra`` patterns replaced."""
    for token, pattern in _compiled(tuple(extra)):
        text = pattern.sub(token, text)
    return text
