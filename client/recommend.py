"""Rank items (news articles, posts, products described in text) for one user with their personal model.

The classifier built from the shared adapters and this user's personal head scores each item; the items
come back ordered by the probability of the label that means "this user wants it" (``liked`` for the
news-interest task, or any label the model was trained with). Runs offline on the device: neither the
items nor the ranking leave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from client.predict import predict
from common.errors import ConfigError

DEFAULT_LABEL = "liked"


@dataclass(frozen=True)
class Recommendation:
    """One item, its rank (1 = best) and the probability of the chosen label."""

    rank: int
    score: float
    item: str


def read_items(path: str | Path) -> list[str]:
    """Items from a text file, one per line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read items from {path}: {exc}") from exc
    return [line.strip() for line in lines if line.strip()]


def recommend(
    state_dir: str | Path,
    items: Sequence[str],
    label: str | None = None,
    top: int = 0,
    key_file: str | Path | None = None,
) -> list[Recommendation]:
    """``items`` ranked by this user's model: highest probability of ``label`` first (ties: input order).

    ``label`` defaults to ``liked``; a model without that label (e.g. tweets sentiment) needs one named.
    ``top`` keeps the best ``top`` items (0 = all).
    """
    if top < 0:
        raise ConfigError(f"top must be >= 0, got {top}")
    if not items:
        raise ConfigError("give at least one item to rank")
    predictions = predict(state_dir, list(items), key_file)
    names = list(predictions[0].probabilities)
    want = DEFAULT_LABEL if label is None else label
    if want not in names:
        hint = "" if label is not None else f" (the default {DEFAULT_LABEL!r} is not one of them)"
        raise ConfigError(
            f"this user's model has the labels {', '.join(names)}{hint}: choose one with --label"
        )
    order = sorted(range(len(items)), key=lambda i: (-predictions[i].probabilities[want], i))
    ranked = [
        Recommendation(rank, predictions[i].probabilities[want], items[i])
        for rank, i in enumerate(order, start=1)
    ]
    return ranked[:top] if top else ranked
