"""Parsing of option values shared by several commands."""

from __future__ import annotations


def split_csv(value: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option value."""
    return [v.strip() for v in value.split(",") if v.strip()]
