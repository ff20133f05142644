"""What a task is to the rest of fedpers: one object owning data rows, targets, loss, metrics and predict.

The client, the server and the simulations call the task (common.tasks.get_task) and never ask which
kind of model or data they hold. A task's per-batch ``scores`` are sums, so evaluation streams over
batches and the summary is exact.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.backbone import Backbone
from common.config import Config
from common.device import device_of
from common.errors import ConfigError
from common.features import Features, PrefixStore

Metrics = dict[str, float | int]


@dataclass(frozen=True)
class Evaluation:
    """A model's scores on one split: accuracy and mean loss (per scored target), plus the task's own."""

    accuracy: float
    loss: float
    metrics: Metrics  # the task's headline metrics (perplexity, entity F1), keyed as common.protocol


class Task(abc.ABC):
    """One task: classify texts, generate text or tag entities. Subclasses fill in the abstract parts."""

    name = ""
    commands: tuple[str, ...] = ()  # the `fedpers` commands that use a trained model of this task
    eval_batch = 128

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def backbone(self) -> Backbone:
        """The per-process backbone of this task and configuration."""

    @abc.abstractmethod
    def load(self, partition_id: int, num_partitions: int, data_path: str | None = None) -> Any:
        """One user's train and test split (its rows; ``.user`` names the user)."""

    @abc.abstractmethod
    def features(
        self,
        backbone: Backbone,
        data: Any,
        split: str,
        device: torch.device | None = None,
        store: PrefixStore | None = None,
    ) -> Features:
        """Features and targets of ``data``'s ``split`` ("train" or "test")."""

    @abc.abstractmethod
    def losses(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each example's loss (one value per example: what DP-SGD clips)."""

    @abc.abstractmethod
    def scores(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Sums over one batch: ``correct``, ``counted`` and ``loss`` (plus the task's own counts)."""

    def _uses(self) -> str:
        return " or ".join(f"`fedpers {c}`" for c in self.commands)

    def users(self, num_partitions: int, data_path: str | None = None) -> list[str]:
        """The user of every partition (loads each one's rows: cheap, cached per process)."""
        return [self.load(p, num_partitions, data_path).user for p in range(num_partitions)]

    def summary(self, sums: dict[str, float]) -> Metrics:
        """The task's own metrics from the summed scores (none by default)."""
        return {}

    def evaluate(self, model: nn.Module, feats: Features) -> Evaluation:
        """Accuracy and mean loss per scored target of ``model`` on ``feats``, and the task's metrics."""
        sums = sum_scores(self.scores, model, feats, self.eval_batch)
        counted = max(sums.get("counted", 0.0), 1.0)
        return Evaluation(
            sums.get("correct", 0.0) / counted, sums.get("loss", 0.0) / counted, self.summary(sums)
        )

    def baseline(self, data: Any) -> Metrics:
        """The user's trivial own-data baseline on their test split (none by default)."""
        return {}

    def predict(self, backbone: Backbone, model: nn.Module, texts: Sequence[str]) -> list[Any]:
        """What `fedpers predict` shows for each text (rows with ``columns`` and ``row()``)."""
        raise ConfigError(f"the {self.name} task has no `fedpers predict`: use {self._uses()}")

    def chat_examples(self, backbone: Backbone, data: Any) -> list[tuple[str, str]]:
        """Turns kept on the device as `fedpers chat` context (none but for chat-trained generators)."""
        return []


Scores = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]


@torch.no_grad()
def sum_scores(scores: Scores, model: nn.Module, feats: Features, batch: int) -> dict[str, float]:
    """``scores`` of ``model`` summed over ``feats`` in batches of ``batch`` rows (in eval mode)."""
    feats = feats.to(device_of(model))  # the data follows the model (a no-op where it already is)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(feats), batch):
        h, m, y = feats.batch(slice(i, i + batch))
        for key, value in scores(model, h, m, y).items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    return sums


def check_command(task: Task, command: str, model_name: str, where: str | Path) -> None:
    """Refuse a `fedpers` command that cannot use this task's model, naming the ones that can."""
    if command not in task.commands:
        raise ConfigError(f"{where} holds a {model_name} model: use {task._uses()}")
