"""Text classification: one label per text (tweets sentiment, news interest, your own labelled file).

The model is the encoder classifier (common.model.PersonalModel): mean-pooled top layers and a linear
head over the labels. Metrics: accuracy and cross-entropy per example; the baseline is each user's own
majority train label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common import protocol as P
from common.backbone import Backbone, cached
from common.data import ClientData, label_names, load_client_data, majority_baseline_accuracy
from common.features import Features, PrefixStore, encode, prefix_features
from common.model import EncoderBackbone, build_backbone
from common.tasks.base import Metrics, Task


@dataclass(frozen=True)
class Prediction:
    """One text's predicted label and the probability of every label."""

    text: str
    label: str
    probabilities: dict[str, float]
    columns: ClassVar[tuple[str, ...]] = ("text", "label", "probabilities")

    def row(self) -> tuple[str, ...]:
        """The table row `fedpers predict` prints."""
        probs = "  ".join(f"{k} {v:.2f}" for k, v in self.probabilities.items())
        return self.text[:60], f"[bold]{self.label}[/]", probs


class ClassifyTask(Task):
    """Classify each text into one of ``task.dataset``'s labels."""

    name = "classify"
    commands = ("predict",)

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names, in head order."""
        return label_names(self.cfg.task)

    def backbone(self) -> EncoderBackbone:
        cfg, n = self.cfg, len(self.labels)
        key = (cfg.model, cfg.lora, n, cfg.personalization.shared_projection)
        return cached(key, lambda: build_backbone(cfg, n))

    def load(self, partition_id: int, num_partitions: int, data_path: str | None = None) -> ClientData:
        return load_client_data(self.cfg.task, partition_id, num_partitions, data_path)

    def features(
        self,
        backbone: Backbone,
        data: Any,
        split: str,
        device: torch.device | None = None,
        store: PrefixStore | None = None,
    ) -> Features:
        texts, labels = getattr(data, f"{split}_texts"), getattr(data, f"{split}_labels")
        n, pooled = self.cfg.task.max_length, self.cfg.lora.r == 0  # no LoRA: the model reads the mean
        return encode(backbone, texts, labels, n, device=device, store=store, pooled=pooled)

    def losses(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(h, m), y, reduction="none")

    def scores(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        logits = model(h, m)
        loss = float(F.cross_entropy(logits, y, reduction="sum"))
        return {"correct": float((logits.argmax(-1) == y).sum()), "counted": float(len(y)), "loss": loss}

    def baseline(self, data: Any) -> Metrics:
        return {P.MAJORITY_ACC: majority_baseline_accuracy(data)}

    @torch.no_grad()
    def predict(self, backbone: Backbone, model: nn.Module, texts: Sequence[str]) -> list[Prediction]:
        """Each text's label and the probability of every label."""
        names = self.labels
        hidden, mask, order = prefix_features(backbone, list(texts), self.cfg.task.max_length)
        probs = torch.cat(
            [
                torch.softmax(model(hidden[i : i + 128], mask[i : i + 128]), -1)
                for i in range(0, len(texts), 128)
            ]
        ).numpy()
        out: list[Prediction | None] = [None] * len(texts)
        for row, idx in enumerate(order):  # rows are sorted by length; map them back to the inputs
            p = probs[row]
            label = names[int(p.argmax())]
            out[int(idx)] = Prediction(
                texts[int(idx)], label, {n: float(v) for n, v in zip(names, p, strict=True)}
            )
        return [p for p in out if p is not None]
