"""Named-entity tagging: a tag per word (BIO), each user tagging the entity types they care about.

The model is the encoder tagger (common.model.TaggerModel): the shared LoRA top layers and a personal
token-level head over the 21-tag union space of common.ner_data. A word's tag is predicted at its first
sub-word token; the other sub-words, the special tokens and padding are never scored. Metrics: token
accuracy and cross-entropy over scored words, and exact-span entity F1 (conlleval); the baseline tags each
word with its most frequent tag in the user's own training tweets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import protocol as P
from common.backbone import Backbone, cached
from common.features import Features, PrefixStore, encode_rows, run_prefix
from common.model import EncoderBackbone, build_backbone
from common.ner_data import TAG_NAMES, TaggedData, baseline_f1, load_tagged_client
from common.spans import entity_counts, f1, render, spans
from common.tasks.base import Metrics, Task

_WORD = re.compile(r"[@#]?[\w'’.:/-]*\w|\S")  # a handle, hashtag, word, URL or number; else one symbol


def words_of(text: str) -> list[str]:
    """``text`` cut into words the way the corpus is (punctuation apart, handles and URLs whole)."""
    return _WORD.findall(text)


def word_ids(
    backbone: Backbone, sentences: Sequence[Sequence[str]], max_length: int
) -> tuple[list[list[int]], list[list[int | None]]]:
    """Token ids of each sentence and, per token, the index of the word it belongs to (None: special)."""
    enc = backbone.tokenizer(
        [list(s) for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length
    )
    return list(enc["input_ids"]), [enc.word_ids(i) for i in range(len(sentences))]


def first_tokens(owners: Sequence[int | None]) -> list[tuple[int, int]]:
    """(token position, word index) of each word's first token (words cut by truncation have none)."""
    out, seen = [], set()
    for pos, word in enumerate(owners):
        if word is not None and word not in seen:
            seen.add(word)
            out.append((pos, word))
    return out


@dataclass(frozen=True)
class Tagged:
    """One text's words, their predicted tags and the entities they make."""

    text: str
    words: tuple[str, ...]
    tags: tuple[str, ...]
    columns: ClassVar[tuple[str, ...]] = ("text", "entities", "count")

    @property
    def entities(self) -> list[tuple[str, str]]:
        """(entity text, type) of every predicted span, in order."""
        return [(" ".join(self.words[a:b]), kind) for a, b, kind in sorted(spans(self.tags))]

    def row(self) -> tuple[str, ...]:
        """The table row `fedpers predict` prints: the text with its spans marked."""
        return self.text[:60], render(self.words, self.tags), str(len(self.entities))


class TagTask(Task):
    """Tag the named entities of each user's tweets, in the user's own label view."""

    name = "tag"
    commands = ("predict",)

    def backbone(self) -> EncoderBackbone:
        cfg, n = self.cfg, len(TAG_NAMES)
        return cached((cfg.model, cfg.lora, n, "tagger"), lambda: build_backbone(cfg, n, per_token=True))

    def load(self, partition_id: int, num_partitions: int, data_path: str | None = None) -> TaggedData:
        return load_tagged_client(self.cfg.task, partition_id, num_partitions)

    def features(
        self,
        backbone: Backbone,
        data: Any,
        split: str,
        device: torch.device | None = None,
        store: PrefixStore | None = None,
    ) -> Features:
        sentences, tags = getattr(data, f"{split}_words"), getattr(data, f"{split}_tags")
        n = self.cfg.task.max_length
        material = [f"tagger|{n}|".encode()]
        for words, row in zip(sentences, tags, strict=True):
            material.append("\x1f".join(words).encode() + b"\x00" + np.asarray(row, np.int64).tobytes())

        def tokenize() -> tuple[list[list[int]], Any]:
            ids, owners = word_ids(backbone, sentences, n)

            def targets(order: np.ndarray) -> torch.Tensor:
                out = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
                for r, i in enumerate(order):
                    for pos, word in first_tokens(owners[i]):
                        out[r, pos] = tags[i][word]
                return out

            return ids, targets

        return encode_rows(backbone, b"".join(material), tokenize, device=device, store=store)

    def losses(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each tweet's mean loss over its scored words (one value per example, as DP-SGD clips)."""
        logits = model(h, m)
        valid = y != -100
        tok = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none") * valid
        return tok.sum(1) / valid.sum(1).clamp(min=1)

    def scores(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        logits = model(h, m)
        valid = y != -100
        pred = logits.argmax(-1)
        loss = float(
            (F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none") * valid).sum()
        )
        gold_rows = [[TAG_NAMES[t] for t in row[ok].tolist()] for row, ok in zip(y, valid, strict=True)]
        pred_rows = [[TAG_NAMES[t] for t in row[ok].tolist()] for row, ok in zip(pred, valid, strict=True)]
        tp, predicted, gold = entity_counts(gold_rows, pred_rows)
        correct = float(((pred == y) & valid).sum())
        counted = float(valid.sum())
        return {
            "correct": correct,
            "counted": counted,
            "loss": loss,
            "tp": tp,
            "pred": predicted,
            "gold": gold,
        }

    def summary(self, sums: dict[str, float]) -> Metrics:
        """Exact-span entity F1 over the split (micro: every entity counts once)."""
        return {P.ENTITY_F1: f1(int(sums.get("tp", 0)), int(sums.get("pred", 0)), int(sums.get("gold", 0)))}

    def baseline(self, data: Any) -> Metrics:
        return {P.MAJORITY_F1: baseline_f1(data)}

    @torch.no_grad()
    def predict(self, backbone: Backbone, model: nn.Module, texts: Sequence[str]) -> list[Tagged]:
        """Each text's words with their predicted tags (a word past ``task.max-length`` tokens is "O")."""
        sentences = [words_of(t) or [t] for t in texts]
        ids, owners = word_ids(backbone, sentences, self.cfg.task.max_length)
        hidden, mask, order = run_prefix(backbone, ids)
        out: list[Tagged | None] = [None] * len(texts)
        for start in range(0, len(texts), 64):
            logits = model(hidden[start : start + 64], mask[start : start + 64]).argmax(-1)
            for r, i in enumerate(order[start : start + 64]):
                tags = ["O"] * len(sentences[i])
                for pos, word in first_tokens(owners[i]):
                    tags[word] = TAG_NAMES[int(logits[r, pos])]
                out[int(i)] = Tagged(texts[int(i)], tuple(sentences[i]), _valid(tags))
        return [t for t in out if t is not None]


def _valid(tags: list[str]) -> tuple[str, ...]:
    """``tags`` with an ``I-x`` that continues no ``x`` made ``B-x`` (what entity F1 counts anyway)."""
    out = list(tags)
    for i, tag in enumerate(out):
        if tag.startswith("I-") and (i == 0 or out[i - 1][2:] != tag[2:]):
            out[i] = "B-" + tag[2:]
    return tuple(out)
