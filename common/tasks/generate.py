"""Text generation: a causal LM learns each user's own text (Shakespeare roles, your own text file).

The model is common.causal_model's: shared LoRA on the top decoder blocks and a personal part before the
frozen output projection. Targets are the text itself, next token by next token (a chat turn's prompt is
attended to and never scored). Metrics: next-token accuracy, the mean loss per predicted token and the
perplexity; there is no trivial baseline.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common import protocol as P
from common.backbone import Backbone, cached
from common.causal_model import CausalBackbone, build_causal_backbone
from common.chat_format import keep_turns
from common.data import ClientData, load_client_data
from common.features import Features, PrefixStore, encode
from common.tasks.base import Metrics, Task, sum_scores


def scored_predictions(
    model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, example row) of every scored next-token prediction.

    Position t is scored by token t+1 where that token is a target (not padding, not an unscored prompt),
    and only those positions are projected onto the vocabulary (``select``): the projection onto 49 152
    tokens is most of a step. The result equals slicing the full logits (:func:`reference_losses`).
    """
    keep = y[:, 1:] != -100
    select = F.pad(keep, (0, 1))  # the last position predicts nothing
    rows = torch.arange(len(y), device=y.device).unsqueeze(1).expand_as(keep)[keep]
    return model(h, m, select=select), y[:, 1:][keep], rows


def reference_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token loss from full (batch, tokens, vocab) logits: the reference formula.

    One value per example is what DP-SGD clips, so a long speech weighs no more than a short one.
    """
    logits, y = logits[:, :-1], y[:, 1:]
    valid = y != -100
    tok = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none") * valid
    return tok.sum(1) / valid.sum(1).clamp(min=1)


def _token_scores(model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    logits, target, _ = scored_predictions(model, h, m, y)
    correct = float((logits.argmax(-1) == target).sum())
    return {
        "correct": correct,
        "counted": float(len(target)),
        "loss": float(F.cross_entropy(logits, target, reduction="sum")),
    }


def next_token_loss(model: nn.Module, feats: Features) -> float:
    """The mean loss per predicted token of ``model`` on ``feats`` (the task's ``eval-loss``)."""
    sums = sum_scores(_token_scores, model, feats, GenerateTask.eval_batch)
    return sums.get("loss", 0.0) / max(sums.get("counted", 0.0), 1.0)


class GenerateTask(Task):
    """Continue each user's text in their own words."""

    name = "generate"
    commands = ("chat", "generate")
    eval_batch = 8  # logits are (batch, tokens, vocab)

    def backbone(self) -> CausalBackbone:
        cfg = self.cfg
        return cached((cfg.model, cfg.lora, "causal"), lambda: build_causal_backbone(cfg))

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
        texts, prompts = getattr(data, f"{split}_texts"), getattr(data, f"{split}_prompts")
        n = self.cfg.task.max_length
        return encode(backbone, texts, None, n, device=device, prompts=prompts, store=store)

    def losses(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each example's mean next-token loss; equals ``reference_losses(model(h, m), y)``."""
        logits, target, rows = scored_predictions(model, h, m, y)
        tok = F.cross_entropy(logits, target, reduction="none")
        total = torch.zeros(len(y), dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
        count = torch.zeros_like(total).index_add(0, rows, torch.ones_like(tok))
        return total / count.clamp(min=1)

    def scores(self, model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        logits, target, _ = scored_predictions(model, h, m, y)
        loss = float(F.cross_entropy(logits, target, reduction="sum"))
        return {
            "correct": float((logits.argmax(-1) == target).sum()),
            "counted": float(len(target)),
            "loss": loss,
        }

    def summary(self, sums: dict[str, float]) -> Metrics:
        """The perplexity: exp of the mean loss per predicted token."""
        return {P.PERPLEXITY: math.exp(min(sums.get("loss", 0.0) / max(sums.get("counted", 0.0), 1.0), 50.0))}

    def chat_examples(self, backbone: Backbone, data: ClientData) -> list[tuple[str, str]]:
        """``client.chat-examples`` of the user's own training turns, for `fedpers chat` (kept on device)."""
        if not data.train_prompts:
            return []
        c = self.cfg.client  # "retrieve" keeps a pool and picks from it per message (client.generate)
        tok, n = backbone.tokenizer, self.cfg.task.max_length
        return keep_turns(
            tok, data.train_prompts, data.train_texts, n, c.chat_pick, c.chat_examples, c.chat_pool
        )
