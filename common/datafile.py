"""Bring-your-own-data files: CSV (header row) or JSONL/JSON with ``text``, ``label`` and optional ``user``.

For the generative assistant (``task.dataset = "text-file"``) the same formats hold free text per user:
``text`` and ``user`` and, for chat-turn training, ``prompt`` (the message each text answers).

Every problem is a :class:`DataError` naming the file and the line, never a crash deep inside torch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError

log = logging.getLogger("common.data")
Table = tuple[tuple[str, ...], np.ndarray, "tuple[str, ...] | None"]  # texts, labels, users (or None)


def read_text_file(path: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...] | None]:
    """(texts, users, prompts or None) of a free-text file with ``text``, ``user`` and optional ``prompt``.

    Rows with empty text are skipped (logged); an empty prompt is allowed (a turn that opens a dialogue).
    """
    records = _records(path, ("text", "user"), "text, user and optionally prompt")
    has_prompt = any("prompt" in rec for _, rec in records)
    texts, users, prompts, skipped = [], [], [], 0
    for loc, rec in records:
        missing = [k for k in ("text", "user") + (("prompt",) if has_prompt else ()) if rec.get(k) is None]
        if missing:
            raise DataError(f"{path} {loc} lacks field(s) {', '.join(map(repr, missing))}")
        fields = {k: rec[k] for k in ("text", "prompt") if k in rec}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise DataError(f"{path} {loc}: {bad[0]} must be a string, got {fields[bad[0]]!r}")
        if not rec["text"].strip():
            skipped += 1
            continue
        user = str(rec["user"]).strip()
        if not user:
            raise DataError(f"{path} {loc}: the user is empty")
        texts.append(rec["text"].strip())
        users.append(user)
        if has_prompt:
            prompts.append(rec["prompt"].strip())
    if skipped:
        log.warning("%s: skipped %d rows with empty text", path, skipped)
    if not texts:
        raise DataError(f"data file {path} has no texts ({skipped} rows with empty text skipped)")
    return tuple(texts), tuple(users), tuple(prompts) if has_prompt else None


def read_file(path: Path, names: tuple[str, ...]) -> Table:
    """Read a CSV (header row) or JSONL/JSON file with text, label and optional user."""
    records = _records(path, ("text", "label"), "text, label and optionally user")
    return _labelled(records, names, path)


def _records(path: Path, required: tuple[str, ...], expected: str) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs of a CSV or JSON(L) file, UTF-8 checked, ``required`` CSV columns checked."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"data file {path} is not UTF-8 text (line {line}); save it as UTF-8") from exc
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(content, path, required, expected)
    if suffix in (".jsonl", ".json"):
        return _json_records(content, path)
    raise DataError(f"data file {path} must end in .csv, .jsonl or .json (got {suffix or 'no suffix'!r})")


def _labelled(records: list[tuple[str, dict[str, Any]]], names: tuple[str, ...], path: Path) -> Table:
    has_user = any("user" in rec for _, rec in records)
    texts, labels, users, skipped = [], [], [], 0
    for loc, rec in records:
        missing = [k for k in ("text", "label") + (("user",) if has_user else ()) if rec.get(k) is None]
        if missing:
            raise DataError(f"{path} {loc} lacks field(s) {', '.join(map(repr, missing))}")
        text = rec["text"]
        if not isinstance(text, str):
            raise DataError(f"{path} {loc}: text must be a string, got {text!r}")
        if not text.strip():
            skipped += 1
            continue
        texts.append(text.strip())
        labels.append(_label(rec["label"], names, path, loc))
        if has_user:
            user = str(rec["user"]).strip()
            if not user:
                raise DataError(f"{path} {loc}: the user is empty")
            users.append(user)
    if skipped:
        log.warning("%s: skipped %d rows with empty text", path, skipped)
    if not texts:
        raise DataError(f"data file {path} has no examples ({skipped} rows with empty text skipped)")
    return tuple(texts), np.array(labels, dtype=np.int64), tuple(users) if has_user else None


def _csv_records(
    content: str, path: Path, required: tuple[str, ...], expected: str
) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if not reader.fieldnames:
        raise DataError(f"data file {path} is empty (expected a header row: {expected})")
    reader.fieldnames = [f.strip() for f in reader.fieldnames]
    missing = [c for c in required if c not in reader.fieldnames]
    if missing:
        raise DataError(
            f"data file {path} lacks column(s) {', '.join(map(repr, missing))}; the header has "
            f"{', '.join(map(repr, reader.fieldnames))} (expected {expected})"
        )
    records = []
    try:
        for row in reader:
            records.append((f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None}))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num} is not valid CSV: {exc}") from exc
    return records


def _json_records(content: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    if path.suffix.lower() == ".json" and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno} is not valid JSON: {exc.msg}") from exc
        pairs = [(f"item {i}", obj) for i, obj in enumerate(items, 1)]
    else:
        pairs = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    pairs.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {n} is not valid JSON: {exc.msg}") from exc
    for loc, obj in pairs:
        if not isinstance(obj, dict):
            raise DataError(f"{path} {loc} must be a JSON object with text and label, got {obj!r:.60}")
    return pairs


def _label(value: Any, names: tuple[str, ...], path: Path, loc: str) -> int:
    """A label name (matched first) or an integer index into ``names``."""
    index: int | None = None
    if isinstance(value, str):
        v = value.strip()
        if v in names:
            return names.index(v)
        if re.fullmatch(r"[+-]?\d+", v):
            index = int(v)
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    if index is not None and 0 <= index < len(names):
        return index
    raise DataError(
        f"{path} {loc}: unknown label {value!r}; allowed: {', '.join(names)} "
        f"(or their indices 0..{len(names) - 1}; see task.labels)"
    )
