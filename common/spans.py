"""BIO entity spans and exact-match entity F1, as conlleval and seqeval (default mode) count them.

A span is ``(start, end_exclusive, type)``. ``B-x`` always opens a span; ``I-x`` continues the open span
only when that span has type ``x``, otherwise it opens a new one (an ``I-`` after ``O`` or after another
type). A predicted entity counts as correct only when its start, end and type all equal a gold entity's.
"""

from __future__ import annotations

from collections.abc import Sequence

Span = tuple[int, int, str]


def _parse(tag: str) -> tuple[str, str]:
    """("B" | "I", type) of a B-/I- tag, ("O", "") of "O"; ValueError otherwise."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if prefix not in ("B", "I") or not dash or not kind:
        raise ValueError(f"{tag!r} is not a BIO tag: expected 'O', 'B-<type>' or 'I-<type>'")
    return prefix, kind


def spans(tags: Sequence[str]) -> set[Span]:
    """The entities of one tagged sentence as (start, end_exclusive, type)."""
    found: set[Span] = set()
    start, open_kind = -1, ""
    for i, tag in enumerate(tags):
        prefix, kind = _parse(tag)
        if prefix == "I" and kind == open_kind:
            continue
        if open_kind:
            found.add((start, i, open_kind))
        start, open_kind = (i, kind) if prefix != "O" else (-1, "")
    if open_kind:
        found.add((start, len(tags), open_kind))
    return found


def entity_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> tuple[int, int, int]:
    """(true positives, predicted entities, gold entities) summed over the sentences."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
    tp = n_pred = n_gold = 0
    for i, (g_tags, p_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(g_tags) != len(p_tags):
            raise ValueError(f"sentence {i}: {len(g_tags)} gold tags but {len(p_tags)} predicted ones")
        g, p = spans(g_tags), spans(p_tags)
        tp, n_pred, n_gold = tp + len(g & p), n_pred + len(p), n_gold + len(g)
    return tp, n_pred, n_gold


def f1(tp: int, predicted: int, gold: int) -> float:
    """Entity F1 = 2·tp / (predicted + gold).

    Defined as 1.0 when predicted == gold == 0: there was nothing to find and nothing was claimed, which is
    the right answer (seqeval would report 0.0 there). One claimed entity with none to find gives 0.0.
    """
    if min(tp, predicted, gold) < 0 or tp > min(predicted, gold):
        raise ValueError(f"inconsistent counts: tp={tp}, predicted={predicted}, gold={gold}")
    if predicted + gold == 0:
        return 1.0
    return 2.0 * tp / (predicted + gold)


def render(words: Sequence[str], tags: Sequence[str]) -> str:
    """The sentence with each entity bracketed and typed, e.g. ``I love [New York]geo-loc !``."""
    if len(words) != len(tags):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    starts = {s: (e, kind) for s, e, kind in spans(tags)}
    out: list[str] = []
    i = 0
    while i < len(words):
        if i in starts:
            end, kind = starts[i]
            out.append(f"[{' '.join(words[i:end])}]{kind}")
            i = end
        else:
            out.append(words[i])
            i += 1
    return " ".join(out)
