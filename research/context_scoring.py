"""Scoring a user's replies with earlier turns of their own per reply (the ``research.lm_context`` study).

``fedpers chat`` puts the same kept turns before every message, or retrieves them per message while it
generates; to *score* a whole test split with each cue's own turns, each reply is tokenized with its own
context (:func:`encode_turns`), and :func:`contrast_losses` scores those features under context-aware
decoding (``fedpers chat --contrast a``). Only the diagnostics use these, so they live here, outside the
product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.causal_model import CausalBackbone, token_targets
from common.chat_format import Example, tokenize_turns
from common.device import device_of
from common.errors import ConfigError, DataError
from common.features import Features, run_prefix
from common.tasks import Backbone
from common.tasks.generate import scored_predictions


def turn_ids(
    tokenizer: Any,
    prompts: Sequence[str],
    replies: Sequence[str],
    max_length: int,
    turn_examples: Sequence[Sequence[Example]],
) -> tuple[list[list[int]], list[int]]:
    """``common.chat_format.tokenize_turns`` with each turn's own earlier turns (one context per turn)."""
    if len(turn_examples) != len(prompts):
        raise DataError(
            f"turn_examples needs one context per turn ({len(turn_examples)} for {len(prompts)} turns)"
        )
    ids: list[list[int]] = []
    heads: list[int] = []
    for prompt, reply, context in zip(prompts, replies, turn_examples, strict=True):
        one, head = tokenize_turns(tokenizer, [prompt], [reply], max_length, context)
        ids.append(one[0])
        heads.append(head[0])
    return ids, heads


def encode_turns(
    backbone: Backbone,
    texts: Sequence[str],
    max_length: int,
    prompts: Sequence[str],
    turn_examples: Sequence[Sequence[Example]],
    chunk: int = 64,
    device: torch.device | None = None,
) -> Features:
    """``common.features.encode`` of chat turns where each prompt has its own earlier turns (never scored).

    Rows are sorted by token length and matched to ``texts`` through ``Features.source``, as ``encode``
    does; nothing is cached (each study encodes a context once).
    """
    if len(texts) == 0:
        raise DataError("no examples to encode")
    if not isinstance(backbone, CausalBackbone):
        raise DataError("prompts (chat turns) need a causal LM; a classifier reads texts only")
    ids, unscored = turn_ids(backbone.tokenizer, prompts, texts, max_length, turn_examples)
    hidden, mask, order = run_prefix(backbone, ids, chunk, device)
    targets = token_targets(ids, unscored, order, mask.shape[1])
    return Features(hidden=hidden, mask=mask, labels=targets, source=torch.as_tensor(order))


@torch.no_grad()
def contrast_losses(
    model: nn.Module,
    without: Features,
    withs: Sequence[Features],
    contrasts: Sequence[float],
    batch: int = 8,
) -> list[list[float]]:
    """Mean next-token loss under context-aware decoding, for each of ``withs`` and each contrast ``a``.

    The distribution is ``softmax((1 + a) * logits(with) - a * logits(without))``, what
    ``client.generate.stream`` samples from with ``contrast=a``; ``a = 0`` is plain ``evaluate`` on the
    tokens both score. Every features set holds the same examples with different earlier turns (from
    ``encode``, which sorts rows by length: rows are matched through ``Features.source``), so they score
    the same tokens (checked; see ``_last_of_each_row``). Returns ``losses[i][j]`` for ``withs[i]`` and
    ``contrasts[j]``.
    """
    if without.labels.dim() != 2:
        raise DataError("contrast losses are for a causal LM's features (per-token targets)")
    if any(len(w) != len(without) for w in withs):
        raise DataError("the features with and without turns must hold the same examples")
    if without.source is None or any(w.source is None for w in withs):
        raise DataError("contrast losses match rows by Features.source: use features from encode")
    row_of = []  # for each features set with turns: its row of each original example
    for w in withs:
        inverse = torch.empty_like(w.source)  # type: ignore[arg-type]
        inverse[w.source] = torch.arange(len(w))
        row_of.append(inverse)
    if any(not math.isfinite(a) or a < 0 for a in contrasts):
        raise ConfigError(f"contrasts must be finite numbers >= 0, got {list(contrasts)}")
    dev = device_of(model)
    without, withs = without.to(dev), [w.to(dev) for w in withs]
    was_training = model.training
    model.eval()
    sums = [[0.0 for _ in contrasts] for _ in withs]
    counted = 0
    for i in range(0, len(without), batch):
        base, target, rows = scored_predictions(model, *without.batch(slice(i, i + batch)))
        originals = without.source[i : i + batch]  # type: ignore[index]
        for w, row_of_w, row in zip(withs, row_of, sums, strict=True):
            logits, w_target, w_rows = scored_predictions(model, *w.batch(row_of_w[originals]))
            same = _last_of_each_row(w_rows, rows, len(originals))
            if not torch.equal(w_target[same], target):
                raise DataError("the features with and without turns score different tokens")
            for j, a in enumerate(contrasts):
                mixed = (1 + a) * logits[same] - a * base
                row[j] += float(F.cross_entropy(mixed, target, reduction="sum"))
        counted += len(target)
    model.train(was_training)
    return [[total / max(counted, 1) for total in row] for row in sums]


def _last_of_each_row(longer: torch.Tensor, shorter: torch.Tensor, n: int) -> torch.Tensor:
    """Indices into ``longer``'s predictions: per example row, its last as many as ``shorter`` has.

    Both list the example row of each scored prediction in row-major order. A reply whose prompt is
    empty (an empty cue, no turns) has no position to predict its first token from; with turns before it
    has, so that example scores one more token there: the shared ones are the last.
    """
    k_long = torch.bincount(longer, minlength=n)
    k_short = torch.bincount(shorter, minlength=n)
    if bool((k_long < k_short).any()):
        raise DataError("the features with turns score fewer tokens than those without")
    ends = torch.cumsum(k_long, 0)
    return torch.cat([torch.arange(int(e) - int(k), int(e)) for e, k in zip(ends, k_short, strict=True)])
