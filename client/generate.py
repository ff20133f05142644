"""Talk to the personal assistant on the device: the latest shared adapters plus this user's own part.

Like ``fedpers predict``, everything comes from the client's encrypted state (the configuration, the
latest global tensors, the personal tensors); the frozen model is the cached local asset, so it works
offline. Tokens are sampled one at a time with a key/value cache through the same split model that was
trained (frozen prefix blocks, then the LoRA blocks and the personal adapter) and streamed as text.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from common.chat_format import Example, chat_prompt, turns_before
from common.device import device_of
from common.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ChatTurns:
    """The user's own turns a state keeps, and how each message gets its earlier turns from them.

    ``how`` is the state's ``client.chat-pick``: with ``"retrieve"`` the kept turns are a pool and each
    message gets the ``k`` closest to it (common.chat_format.retrieve_examples); otherwise the first ``k``
    kept turns precede every message.
    """

    kept: list[Example]
    how: str
    k: int

    def limit(self, k: int) -> ChatTurns:
        """The same turns with at most ``k`` per message (-1: the state's own choice; 0: none)."""
        if k < -1:
            raise ConfigError(f"--examples must be -1 (the state's choice), 0 (none) or a count, got {k}")
        if k > len(self.kept):
            raise ConfigError(
                f"{k} turns asked for, but the state keeps {len(self.kept)} of this user's turns "
                "(client.chat-examples, or client.chat-pool with chat-pick = retrieve, at training time)"
            )
        return self if k < 0 else dataclasses.replace(self, k=k)

    def for_message(self, message: str) -> list[Example]:
        """The earlier turns to put before ``message``."""
        return turns_before(self.kept, self.how, self.k, message)


@dataclasses.dataclass
class Conversation:
    """One chat session's earlier (message, answer) turns; the oldest are dropped to fit the context.

    ``context`` is how many tokens the model attends to (its position limit). Nothing is saved: the
    memory ends with the session.
    """

    context: int
    turns: list[Example] = dataclasses.field(default_factory=list)

    def add(self, message: str, answer: str) -> None:
        """Remember one exchange."""
        self.turns.append((message, answer))

    def fitting(
        self, tok: Any, message: str, examples: Sequence[Example], max_new_tokens: int
    ) -> list[Example]:
        """The latest turns that fit, after ``examples`` and before ``message``, with room for the reply."""
        budget = self.context - max_new_tokens
        for start in range(len(self.turns)):
            recent = self.turns[start:]
            text = chat_prompt(tok, message, [*examples, *recent])
            if len(tok(text, add_special_tokens=False)["input_ids"]) <= budget:
                return recent
        return []


def context_size(backbone: Any) -> int:
    """How many tokens the backbone's causal LM attends to (its position limit)."""
    return int(backbone.prefix.config.max_position_embeddings)


def load_chat(
    state_dir: str | Path, key_file: str | Path | None = None, device: str = "auto"
) -> tuple[Any, Any, ChatTurns]:
    """(backbone, personalized causal LM, the user's turns and how to use them) from a client's state.

    Clear errors when the state cannot give a causal LM. The turns (``client.chat-examples``, or the
    ``client.chat-pool`` to retrieve from) are what ``stream`` puts before each message as earlier turns
    of the conversation. The model runs on ``device`` (``auto``: CUDA, then MPS, then the CPU).
    """
    from client.predict import load_personal

    cfg, backbone, model, state = load_personal(state_dir, key_file, command="chat", device=device)
    return backbone, model, kept_turns(cfg, state.examples)


def kept_turns(cfg: Any, examples: Sequence[Example]) -> ChatTurns:
    """The turns a state keeps (``examples``), used as its configuration (``client.chat-*``) says."""
    kept, how = list(examples), cfg.client.chat_pick
    return ChatTurns(kept, how, min(cfg.client.chat_examples, len(kept)) if how == "retrieve" else len(kept))


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


@torch.no_grad()
def stream(
    backbone: Any,
    model: Any,
    prompt: str,
    *,
    chat: bool = True,
    max_new_tokens: int = 80,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed: int | None = None,
    examples: Sequence[tuple[str, str]] = (),
    contrast: float = 0.0,
    history: Sequence[Example] = (),
) -> Iterator[str]:
    """Yield the reply to ``prompt`` piece by piece (the chat template when ``chat``, else a continuation).

    With ``chat``, ``examples`` (cue, reply) come first as earlier turns (common.chat_format), then
    ``history``, this conversation's earlier (message, answer) turns (see :class:`Conversation`). With
    ``contrast`` a > 0 each token is drawn from ``(1 + a) * logits(with the turns) - a * logits(without)``
    (context-aware decoding): what the user's turns change about the next token is amplified. It costs a
    second model pass per token, on the conversation without the user's kept turns.
    """
    from transformers import DynamicCache

    from common.causal_model import step_mask

    if not prompt.strip():
        raise ConfigError("the prompt is empty: give a text to continue (or, in chat, a message)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tok = backbone.tokenizer
    if (examples or history) and not chat:
        raise ConfigError("example turns need the chat format (chat=True); a continuation has no turns")
    if not math.isfinite(contrast) or contrast < 0:
        raise ConfigError(f"contrast must be a finite number >= 0, got {contrast}")
    if contrast > 0 and not examples:
        raise ConfigError("contrast amplifies the user's turns: it needs turns before the message")
    dev = device_of(backbone.prefix)  # the model was made on the same device (common.device.place)

    def ids_of(text: str) -> torch.Tensor:
        # the chat template has its special tokens already
        return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(dev)

    # one (cache, position) per prompt: the prompt as trained, and with contrast the message alone
    prompts = [ids_of(chat_prompt(tok, prompt, [*examples, *history]) if chat else prompt)]
    if contrast > 0:
        prompts.append(ids_of(chat_prompt(tok, prompt, history)))
    caches = [DynamicCache(config=backbone.prefix.config) for _ in prompts]
    positions = [0 for _ in prompts]

    def next_logits(k: int, step: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(positions[k], positions[k] + step.shape[1], device=dev).unsqueeze(0)
        mask = step_mask(backbone.prefix.config, backbone.prefix.embed(step), caches[k], pos)
        hidden = backbone.prefix(step, mask, caches[k], pos)
        positions[k] += step.shape[1]
        return model(hidden, mask, caches[k], pos)[0, -1].float().cpu()  # sampled with a CPU generator

    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))
    eos = {t for t in (tok.eos_token_id, getattr(tok, "sep_token_id", None)) if t is not None}
    produced: list[int] = []
    shown = ""
    steps = prompts
    for _ in range(max_new_tokens):
        logits = next_logits(0, steps[0])
        if contrast > 0:
            logits = (1.0 + contrast) * logits - contrast * next_logits(1, steps[1])
        nxt = _sample(logits, temperature, top_p, gen)
        if nxt in eos:
            break
        produced.append(nxt)
        full = tok.decode(produced, skip_special_tokens=True)
        if len(full) > len(shown) and not full.endswith("\ufffd"):  # whole characters only
            yield full[len(shown) :]
            shown = full
        steps = [torch.tensor([[nxt]], device=dev) for _ in prompts]
    full = tok.decode(produced, skip_special_tokens=True)
    if len(full) > len(shown):
        yield full[len(shown) :]
