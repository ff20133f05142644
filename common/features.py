"""Tokenize texts and run them once through the frozen prefix; cache the result per process."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

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
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index``, trimmed to the longest sequence among them."""
        mask = self.mask[index]
        width = max(int(mask.sum(1).max().item()) if len(mask) else 1, 1)
        return self.hidden[index][:, :width], mask[:, :width], self.labels[index]


def encode(
    backbone: Backbone, texts: Sequence[str], labels: np.ndarray, max_length: int, chunk: int = 64
) -> Features:
    """Features of ``texts`` under ``backbone`` (cached: the prefix is frozen, so this is exact)."""
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise DataError("no examples to encode")
    digest = hashlib.sha256()
    digest.update(f"{backbone.fingerprint}|{max_length}|".encode())
    for t in texts:
        digest.update(t.encode("utf-8", "replace") + b"\x00")
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    key = digest.hexdigest()
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    enc = backbone.tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    parts = []
    for i in range(0, len(texts), chunk):
        parts.append(backbone.prefix(enc["input_ids"][i : i + chunk], enc["attention_mask"][i : i + chunk]))
    feats = Features(
        hidden=torch.cat(parts).contiguous(),
        mask=enc["attention_mask"].long(),
        labels=torch.tensor(np.array(labels, dtype=np.int64)),
    )
    with _LOCK:
        _CACHE[key] = feats
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return feats
