"""Tokenize texts and run them once through the frozen prefix; cache the result per process."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.chat_format import tokenize_turns
from common.device import frozen_autocast
from common.errors import DataError
from common.model import Backbone

_CACHE: OrderedDict[str, Features] = OrderedDict()
_CACHE_SIZE = 64
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Features:
    """Prefix hidden states of a set of examples, with masks and labels."""

    hidden: torch.Tensor  # (N, T, H) float32
    mask: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N,) int64 class ids, or (N, T) token ids for a causal LM (-100 = padding)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index``, trimmed to the longest sequence among them."""
        mask = self.mask[index]
        width = max(int(mask.sum(1).max().item()) if len(mask) else 1, 1)
        labels = self.labels[index]
        if labels.dim() == 2:  # a causal LM's per-token targets are trimmed with the tokens
            labels = labels[:, :width]
        return self.hidden[index][:, :width], mask[:, :width], labels

    def to(self, device: torch.device) -> Features:
        """These features on ``device`` (the same object when they are already there)."""
        if self.hidden.device == device:
            return self
        return Features(self.hidden.to(device), self.mask.to(device), self.labels.to(device))


def encode(
    backbone: Backbone,
    texts: Sequence[str],
    labels: np.ndarray,
    max_length: int,
    chunk: int = 64,
    device: torch.device | None = None,
    prompts: Sequence[str] = (),
) -> Features:
    """Features of ``texts`` under ``backbone``, rows sorted by token length (cached per process).

    The prefix is frozen, so caching is exact; the row order does not matter to training (Poisson or
    shuffled batches) or evaluation, and ``labels`` are reordered with the rows. The prefix runs on
    ``device`` (bf16 autocast on CUDA, see common.device); the cached features live on the CPU.
    With ``prompts`` (a causal LM trained on chat turns) each text is the reply to its prompt: the
    prompt's tokens are attended to but not scored (see common.chat_format).
    """
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise DataError("no examples to encode")
    if prompts and not backbone.causal:
        raise DataError("prompts (chat turns) need a causal LM; a classifier reads texts only")
    digest = hashlib.sha256()
    digest.update(f"{backbone.fingerprint}|{max_length}|{len(prompts)}|".encode())
    for t in (*texts, *prompts):
        digest.update(t.encode("utf-8", "replace") + b"\x00")
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    key = digest.hexdigest()
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    if prompts:
        ids, unscored = tokenize_turns(backbone.tokenizer, prompts, texts, max_length)
    else:
        ids, unscored = _token_ids(backbone, texts, max_length), [0] * len(texts)
    hidden, mask, order = run_prefix(backbone, ids, chunk, device)
    if backbone.causal:  # the targets are the text itself, next token by next token
        targets = _token_targets(ids, unscored, order, mask.shape[1])
        return _store(key, Features(hidden=hidden, mask=mask, labels=targets))
    feats = Features(
        hidden=hidden,
        mask=mask,
        labels=torch.tensor(np.asarray(labels, dtype=np.int64)[order]),
    )
    return _store(key, feats)


def _store(key: str, feats: Features) -> Features:
    with _LOCK:
        _CACHE[key] = feats
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return feats


def _token_targets(
    ids: Sequence[Sequence[int]], unscored: Sequence[int], order: np.ndarray, width: int
) -> torch.Tensor:
    """(N, width) target ids in row order: -100 where there is no token and on unscored prompt tokens."""
    out = torch.full((len(ids), width), -100, dtype=torch.long)
    for row, i in enumerate(order):
        out[row, unscored[i] : len(ids[i])] = torch.tensor(ids[i][unscored[i] :], dtype=torch.long)
    return out


def _token_ids(backbone: Backbone, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return list(backbone.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])


def prefix_features(
    backbone: Backbone,
    texts: Sequence[str],
    max_length: int,
    chunk: int = 64,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Prefix hidden states of ``texts``, sorted by token length; returns (hidden, mask, order)."""
    return run_prefix(backbone, _token_ids(backbone, texts, max_length), chunk, device)


def run_prefix(
    backbone: Backbone,
    ids: Sequence[Sequence[int]],
    chunk: int = 64,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Prefix hidden states of token sequences ``ids``, sorted by length; returns (hidden, mask, order).

    Sequences run shortest first in chunks padded only to the chunk's longest one, so the frozen layers
    never compute on padding beyond that (tweets: about half the tokens of padding to the longest text).
    Real tokens do not attend to padding, so their states equal a full-batch forward up to float rounding;
    padded positions are zero and masked. ``order[i]`` is the input index of row ``i``.
    """
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(lengths, kind="stable")
    width = int(lengths.max())
    hidden = torch.zeros(len(ids), width, backbone.prefix.config.hidden_size)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    pad = backbone.tokenizer.pad_token_id or 0
    device = device or torch.device("cpu")
    prefix = backbone.prefix.to(device)  # a no-op on the CPU; moves the per-process backbone once
    for start in range(0, len(ids), chunk):
        rows = order[start : start + chunk]
        w = int(lengths[rows].max())
        batch_ids = torch.full((len(rows), w), pad, dtype=torch.long)
        batch_mask = torch.zeros(len(rows), w, dtype=torch.long)
        for j, r in enumerate(rows):
            batch_ids[j, : lengths[r]] = torch.tensor(ids[r])
            batch_mask[j, : lengths[r]] = 1
        with torch.no_grad(), frozen_autocast(device):
            out = prefix(batch_ids.to(device), batch_mask.to(device))
        hidden[start : start + len(rows), :w] = out.float().cpu()
        mask[start : start + len(rows), :w] = batch_mask
    return hidden, mask, order
