"""The encoder backbones: a frozen pretrained encoder, PEFT LoRA on its top layers, and a personal head.

The encoder is cut in two at ``model.frozen-layers`` (with ``lora.r = 0``: after its last layer, and only
the head trains):

* :class:`FrozenPrefix` — embeddings and the bottom layers, no LoRA, always ``no_grad`` and in eval mode.
  Its output depends on no trainable parameter, so a client computes it once per example and caches it
  (exact, not an approximation).
* :class:`PersonalModel` — the top layers wrapped by ``peft.get_peft_model`` (the shared LoRA adapters),
  mean pooling, and the classification ``head``, kept OUTSIDE the PeftModel so PEFT never puts it into
  an adapter state dict. This is the only module Opacus ever sees.
* :class:`TaggerModel` — the same top layers and a token-level ``head`` (one tag per token, no pooling):
  the named-entity tagger (common.tasks.tag).

Every node builds the same frozen base (pretrained weights, or a seeded random init for ``tiny``) and
the same initial adapters and head (seeded with ``model.seed``).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as hf_logging

from common.config import Config
from common.errors import DataError, ModelError
from common.features import Features
from common.lora import add_lora
from common.tokenizer import load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf_logging.set_verbosity_error()  # the pooler weights MiniLM ships but we do not use are not news

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def run_layers(
    layers: nn.ModuleList, config: BertConfig, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Run BERT encoder layers over ``hidden`` with a padding mask in the layout the model expects."""
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in layers:
        out = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class FrozenPrefix(nn.Module):
    """Embeddings and the bottom encoder layers (no LoRA, never trained)."""

    def __init__(self, bert: BertModel, num_layers: int) -> None:
        super().__init__()
        self.config = bert.config
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(list(bert.encoder.layer[:num_layers]))
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen layers, shape (batch, tokens, hidden)."""
        return run_layers(self.layers, self.config, self.embeddings(input_ids=input_ids), attention_mask)


class _Identity(nn.Module):
    """No top layers (``lora.r = 0``): the cached prefix output is the body's output."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hidden


class _TopLayers(nn.Module):
    """The encoder layers that carry LoRA (a plain container PEFT can wrap)."""

    def __init__(self, bert: BertModel, first: int) -> None:
        super().__init__()
        self.config = bert.config
        self.layers = nn.ModuleList(list(bert.encoder.layer[first:]))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_layers(self.layers, self.config, hidden, attention_mask)


class PersonalModel(nn.Module):
    """Top layers with LoRA (``body``, a PeftModel) + mean pooling + the personal ``head``.

    With ``projection = k`` (head-only models) a linear ``proj`` (hidden → k) sits between the pooling
    and the head: the low-dimensional representation users share, under a head of k × classes
    (Jain et al. 2021's linear representation; common.split gives ``proj`` the body's role).
    """

    def __init__(self, body: nn.Module, hidden_size: int, num_classes: int, projection: int = 0) -> None:
        super().__init__()
        self.body = body
        self.proj = nn.Linear(hidden_size, projection) if projection else None
        self.head = nn.Linear(projection or hidden_size, num_classes)

    def head_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the head sees: the body's output, mean-pooled over the unmasked tokens (and projected)."""
        out = self.body(hidden, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.proj(pooled) if self.proj is not None else pooled

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from cached prefix features and their attention mask."""
        return self.head(self.head_inputs(hidden, attention_mask))


def head_view(model: nn.Module, feats: Features, chunk: int = 64) -> tuple[PersonalModel, Features] | None:
    """When only ``model.head`` trains, the head alone and its inputs, computed once.

    Fitting the returned model on the returned features fits ``model.head`` in place (the same module)
    without running the frozen top layers every epoch: the personal refit of fedper and ffa after the last
    round takes one pass through them instead of one per epoch. The inputs are those evaluation sees
    (eval mode, so no dropout). Returns None when anything but the head trains, or for a tagger.
    """
    if not isinstance(model, PersonalModel):
        return None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any(not n.startswith("head.") for n in trainable):
        return None
    was_training = model.training
    model.eval()
    device = next(model.head.parameters()).device
    parts = []
    with torch.no_grad():
        for start in range(0, len(feats), chunk):
            h, m, _ = feats.batch(slice(start, start + chunk))
            parts.append(model.head_inputs(h.to(device), m.to(device)).float())
    model.train(was_training)
    inputs = torch.cat(parts).unsqueeze(1)  # (N, 1, k): one "token" whose mean pooling is itself
    view = PersonalModel(_Identity(), inputs.shape[-1], model.head.out_features)
    view.head = model.head
    mask = torch.ones(inputs.shape[:2], dtype=feats.mask.dtype, device=device)
    return view, Features(inputs, mask, feats.labels.to(device), feats.source)


class TaggerModel(nn.Module):
    """Top layers with LoRA (``body``) + the personal token-level ``head``: tag logits for every token."""

    def __init__(self, body: nn.Module, hidden_size: int, num_tags: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden_size, num_tags)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tag logits (batch, tokens, tags) from cached prefix features."""
        return self.head(self.body(hidden, attention_mask))


@dataclass
class EncoderBackbone:
    """Everything a node needs to build personal encoder models (classifier or tagger) for one config."""

    tokenizer: PreTrainedTokenizerBase
    prefix: FrozenPrefix
    template: PersonalModel | TaggerModel
    total_params: int
    fingerprint: str

    def new_model(self) -> nn.Module:
        """A fresh copy of the seeded initial model (frozen weights shared in memory are copied too)."""
        model = copy.deepcopy(self.template)
        model.train()
        return model

    def targets(
        self,
        ids: Sequence[Sequence[int]],
        unscored: Sequence[int],
        labels: np.ndarray | None,
        order: np.ndarray,
    ) -> torch.Tensor:
        """A classifier's targets: one label per example, in row order (an encoder reads texts only)."""
        if any(unscored):
            raise DataError("prompts (chat turns) need a causal LM; an encoder reads texts only")
        if labels is None:
            raise DataError("a classifier's texts need their labels")
        return torch.tensor(np.asarray(labels, dtype=np.int64)[order])


def _load_bert(cfg: Config) -> BertModel:
    if cfg.model.name == "tiny":
        tok = load_tokenizer("tiny")
        torch.manual_seed(cfg.model.seed + 12345)
        config = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **TINY)  # type: ignore[arg-type]
        bert = BertModel(config, add_pooling_layer=False)
    else:
        from common.assets import asset_path

        bert = BertModel.from_pretrained(str(asset_path("minilm")), add_pooling_layer=False)
    # Dropout in the frozen encoder would make cached features random; DP noise regularises enough.
    bert.config.hidden_dropout_prob = 0.0
    for module in bert.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return bert


_OWN = ("head", "proj")  # trainable modules outside the pretrained encoder


def build_backbone(cfg: Config, num_classes: int, *, per_token: bool = False) -> EncoderBackbone:
    """The frozen prefix and the seeded initial model for ``cfg``: a classifier, or a tagger if per_token."""
    if num_classes < 2:
        raise ModelError(
            f"a {'tagger' if per_token else 'classifier'} needs at least 2 classes, got {num_classes}"
        )
    bert = _load_bert(cfg)
    n_layers = bert.config.num_hidden_layers
    k = n_layers if cfg.lora.r == 0 else cfg.model.frozen_layers  # no LoRA: every layer frozen, cached
    if k >= n_layers and cfg.lora.r:
        raise ModelError(
            f"model.frozen-layers = {k} leaves no layer for LoRA: the {cfg.model.name} encoder has "
            f"{n_layers} layers; use 0..{n_layers - 1}"
        )
    total = sum(p.numel() for p in bert.parameters())
    bert.requires_grad_(False)
    prefix = FrozenPrefix(bert, k)
    torch.manual_seed(cfg.model.seed)
    body = add_lora(_TopLayers(bert, k), cfg) if cfg.lora.r else _Identity()
    projection = cfg.personalization.shared_projection
    if per_token:
        template: PersonalModel | TaggerModel = TaggerModel(body, bert.config.hidden_size, num_classes)
    else:
        template = PersonalModel(body, bert.config.hidden_size, num_classes, projection)
    total += sum(p.numel() for n, p in template.named_parameters() if "lora_" in n or n.split(".")[0] in _OWN)
    # a classifier's fingerprint predates taggers and projections: theirs extend it
    kind: object = (
        (num_classes, "tagger")
        if per_token
        else (num_classes, "proj", projection)
        if projection
        else num_classes
    )
    fp = hashlib.sha256(repr((cfg.model, cfg.lora, kind)).encode()).hexdigest()[:16]
    tokenizer = load_tokenizer(cfg.model.name)
    return EncoderBackbone(
        tokenizer=tokenizer, prefix=prefix, template=template, total_params=total, fingerprint=fp
    )
