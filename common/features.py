"""Tokenize texts and run them once through the frozen prefix; cache the result per process.

A client may also keep the prefix's output on its own disk (``client.feature-cache``, see
client.feature_cache) so that a later process (the next run, the next mode of a ``--compare``) skips the
frozen forward pass. That persistent key is derived from what the output depends on: the prefix's weights,
the token ids, the device type and the library versions, never from configuration names.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import transformers
from torch import nn

from common.backbone import Backbone
from common.chat_format import Example, tokenize_turns
from common.device import frozen_autocast, place
from common.errors import DataError

_CACHE: OrderedDict[str, Features] = OrderedDict()
# The per-process cache holds features up to this many bytes (least recently used out first): a simulation
# process serves many users in turn, and re-running the frozen prefix is most of a small client's round.
# $FEDPERS_FEATURE_MEMORY (MiB) changes it.
_CACHE_BYTES = int(float(os.environ.get("FEDPERS_FEATURE_MEMORY", "1024")) * 2**20)
_ROWS: OrderedDict[str, torch.Tensor] = OrderedDict()  # pooled rows (classifiers without LoRA), same budget
_LOCK = threading.Lock()
_DIGESTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
PrefixOutput = tuple[torch.Tensor, torch.Tensor, np.ndarray]  # (hidden, mask, order) of run_prefix


@dataclass(frozen=True)
class Features:
    """Prefix hidden states of a set of examples, with masks and labels."""

    hidden: torch.Tensor  # (N, T, H) float32
    mask: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N,) int64 class ids, or (N, T) per-token targets (-100 = not scored)
    source: torch.Tensor | None = None  # (N,) each row's index among the texts encoded (rows are sorted)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index``, trimmed to the longest sequence among them."""
        mask = self.mask[index]
        width = max(int(mask.sum(1).max().item()) if len(mask) else 1, 1)
        labels = self.labels[index]
        if labels.dim() == 2:  # per-token targets are trimmed with the tokens
            labels = labels[:, :width]
        return self.hidden[index][:, :width], mask[:, :width], labels

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors."""
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.mask, self.labels))

    def to(self, device: torch.device) -> Features:
        """These features on ``device`` (the same object when they are already there)."""
        if self.hidden.device == device:
            return self
        return Features(self.hidden.to(device), self.mask.to(device), self.labels.to(device), self.source)


class PrefixStore(Protocol):
    """Somewhere to keep prefix outputs between processes (client.feature_cache.FeatureCache)."""

    def load(self, key: str) -> PrefixOutput | None:
        """The output saved under ``key``, or ``None``."""

    def save(self, key: str, output: PrefixOutput) -> None:
        """Keep ``output`` under ``key``."""


def encode(
    backbone: Backbone,
    texts: Sequence[str],
    labels: np.ndarray | None,
    max_length: int,
    chunk: int = 64,
    device: torch.device | None = None,
    prompts: Sequence[str] = (),
    store: PrefixStore | None = None,
    examples: Sequence[Example] = (),
    pooled: bool = False,
) -> Features:
    """Features of ``texts`` under ``backbone``, rows sorted by token length (cached per process and device).

    ``pooled``: each row is the mean of its token states, one position wide (what a classifier without
    LoRA reads: exact, and a few hundred times smaller to keep for many users).

    The prefix is frozen, so caching is exact; the row order does not matter to training (Poisson or
    shuffled batches) or evaluation, and the targets (``backbone.targets``: ``labels`` for a
    classifier, the text itself for a causal LM, which takes ``labels = None``) are put in row order.
    The prefix runs on ``device`` (bf16 autocast on CUDA, see common.device); the cached features live
    on the CPU.
    With ``prompts`` (a causal LM trained on chat turns) each text is the reply to its prompt: the
    prompt's tokens are attended to but not scored (see common.chat_format). With ``store`` the prefix's
    output is looked up there first and saved there after it is computed. ``examples`` (chat turns only)
    are earlier turns put before every prompt, attended to and never scored (common.chat_format).
    """
    if labels is not None and len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise DataError("no examples to encode")
    if examples and not prompts:
        raise DataError("example turns go before chat prompts: give prompts too")
    material = [f"{max_length}|{len(prompts)}|{len(examples)}|".encode()]
    for t in (*texts, *prompts, *(part for turn in examples for part in turn)):
        material.append(t.encode("utf-8", "replace") + b"\x00")
    if labels is not None:
        material.append(b"labels|" + np.asarray(labels, dtype=np.int64).tobytes())

    def tokenize() -> tuple[list[list[int]], Callable[[np.ndarray], torch.Tensor]]:
        if prompts:
            ids, unscored = tokenize_turns(backbone.tokenizer, prompts, texts, max_length, examples)
        else:
            ids, unscored = _token_ids(backbone, texts, max_length), [0] * len(texts)
        return ids, lambda order: backbone.targets(ids, unscored, labels, order)

    if pooled:
        material.append(b"|pooled")
    return encode_rows(backbone, b"".join(material), tokenize, chunk, device, store, pooled)


def encode_rows(
    backbone: Backbone,
    material: bytes,
    tokenize: Callable[[], tuple[list[list[int]], Callable[[np.ndarray], torch.Tensor]]],
    chunk: int = 64,
    device: torch.device | None = None,
    store: PrefixStore | None = None,
    pooled: bool = False,
) -> Features:
    """Features of the rows ``tokenize()`` gives: (token ids, targets in a row order) — every task's encoder.

    ``material`` is everything the ids and targets depend on besides the backbone and the device; it keys
    the per-process cache, so ``tokenize`` runs only on a miss.
    """
    digest = hashlib.sha256()
    where = (device or torch.device("cpu")).type  # bf16 on CUDA: not the CPU's float32 features
    digest.update(f"{backbone.fingerprint}|{where}|".encode() + material)
    key = digest.hexdigest()
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    ids, targets = tokenize()
    if pooled:
        hidden, order = _pooled_rows(backbone, ids, chunk, device, store)
        mask = torch.ones(len(ids), 1, dtype=torch.long)
    else:
        hidden, mask, order = run_prefix(backbone, ids, chunk, device, store)
    feats = Features(hidden=hidden, mask=mask, labels=targets(order), source=torch.as_tensor(order))
    with _LOCK:
        _CACHE[key] = feats
        total = sum(f.nbytes for f in _CACHE.values())
        while len(_CACHE) > 1 and total > _CACHE_BYTES:
            total -= _CACHE.popitem(last=False)[1].nbytes
    return feats


def _pooled_rows(
    backbone: Backbone,
    ids: Sequence[Sequence[int]],
    chunk: int,
    device: torch.device | None,
    store: PrefixStore | None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Each row's mean token state, ``(N, 1, H)`` in length order, with ``order`` as run_prefix gives it.

    Kept per row (keyed by the frozen prefix's weights, the device and the token ids, not by the rest of
    the model: another head, projection or seed over the same pretrained encoder reads the same rows), so
    a text met again — the same news article in many users' data, the same tweet in another seed's
    partition or another benchmark cell — is not re-encoded.
    Only the rows not kept yet go through the prefix (run_prefix, with ``store``). A row's vector can
    differ in its last float bits from one computed among other rows (chunk padding changes rounding).
    """
    where = (device or torch.device("cpu")).type
    prefix = f"{prefix_digest(backbone.prefix)}|{where}|"
    keys = [prefix + ",".join(map(str, seq)) for seq in ids]
    with _LOCK:
        rows = {k: _ROWS[k] for k in keys if k in _ROWS}
        for k in rows:
            _ROWS.move_to_end(k)
    unique = list(dict.fromkeys(k for k in keys if k not in rows))  # each missing text once
    if unique:
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        hidden, mask, order = run_prefix(backbone, [ids[first[k]] for k in unique], chunk, device, store)
        means = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # padding is zero in ``hidden``
        fresh = {unique[int(src)]: means[row].clone() for row, src in enumerate(order)}
        rows.update(fresh)
        with _LOCK:
            _ROWS.update(fresh)
            while len(_ROWS) > 1 and len(_ROWS) * means.shape[1] * 4 > _CACHE_BYTES:
                _ROWS.popitem(last=False)
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(lengths, kind="stable")
    return torch.stack([rows[keys[i]] for i in order]).unsqueeze(1), order


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


def prefix_digest(prefix: nn.Module) -> str:
    """SHA-256 of the prefix's weights and buffers (names, dtypes, shapes, bytes), once per module."""
    with _LOCK:
        if prefix in _DIGESTS:
            return _DIGESTS[prefix]
    h = hashlib.sha256(type(prefix).__name__.encode())
    for name, tensor in prefix.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    digest = h.hexdigest()
    with _LOCK:
        _DIGESTS[prefix] = digest
    return digest


def store_key(backbone: Backbone, ids: Sequence[Sequence[int]], device: torch.device, chunk: int = 64) -> str:
    """The persistent key of ``run_prefix(backbone, ids, chunk, device)``: weights, ids, device, versions.

    ``chunk`` sets each chunk's padded width, which can change the float rounding, so it is part of it.
    """
    h = hashlib.sha256(
        f"prefix-v1|{prefix_digest(backbone.prefix)}|{device.type}|{chunk}|torch {torch.__version__}|"
        f"transformers {transformers.__version__}|{len(ids)}|".encode()
    )
    for seq in ids:
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"\xff" * 8)
    return h.hexdigest()


def run_prefix(
    backbone: Backbone,
    ids: Sequence[Sequence[int]],
    chunk: int = 64,
    device: torch.device | None = None,
    store: PrefixStore | None = None,
) -> PrefixOutput:
    """Prefix hidden states of token sequences ``ids``, sorted by length; returns (hidden, mask, order).

    Sequences run shortest first in chunks padded only to the chunk's longest one, so the frozen layers
    never compute on padding beyond that (tweets: about half the tokens of padding to the longest text).
    Real tokens do not attend to padding, so their states equal a full-batch forward up to float rounding;
    padded positions are zero and masked. ``order[i]`` is the input index of row ``i``. With ``store`` an
    output saved by an earlier process for the same weights and ids is returned instead of recomputed.
    """
    device = device or torch.device("cpu")
    key = store_key(backbone, ids, device, chunk) if store is not None else ""
    if store is not None:
        saved = store.load(key)
        if saved is not None:
            return saved
    output = _forward(backbone, ids, chunk, device)
    if store is not None:
        store.save(key, output)
    return output


def _forward(
    backbone: Backbone, ids: Sequence[Sequence[int]], chunk: int, device: torch.device
) -> PrefixOutput:
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(lengths, kind="stable")
    width = int(lengths.max())
    config: Any = backbone.prefix.config
    hidden = torch.zeros(len(ids), width, config.hidden_size)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    pad = backbone.tokenizer.pad_token_id or 0
    place(backbone, device)  # a no-op where it already is; models made next are born there too
    prefix = backbone.prefix
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
        hidden[start : start + len(rows), :w] = out.float().cpu() * batch_mask[..., None]  # padding: 0
        mask[start : start + len(rows), :w] = batch_mask
    return hidden, mask, order
