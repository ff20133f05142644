"""How a causal LM sees a conversation turn: one format for training on (cue, reply) pairs and for chat.

Training on chat turns (``task.lm-format = "chat"``) and ``fedpers chat`` must put exactly the same tokens
before the reply, or the personal model is trained for one prompt and asked with another. Both go
through :func:`chat_prompt`; the prompt and the reply are tokenized separately (as generation does: the
prompt is tokenized, the reply is produced token by token), and only the reply's tokens and the
end-of-turn marker are scored.

The system turn is empty: SmolLM2's template would otherwise insert its default persona ("You are a
helpful AI assistant named SmolLM…", ~20 tokens on every example), which is the voice a personal
assistant is meant to move away from. Tokenizers without a chat template (the tiny test LM) use
``message + "\\n"`` as the prompt and their end-of-sequence token as the end of turn.

A few of the user's own training turns can precede the message as earlier turns of the conversation
(``examples``, see :func:`pick_examples`): in-context personalization on the device, next to the trained
personal part. The client keeps them in its encrypted state; they are never sent.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from common.errors import DataError

SYSTEM = ""


def has_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` brings a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


Example = tuple[str, str]  # (cue, reply): one earlier turn of the conversation


def chat_prompt(tokenizer: Any, message: str, examples: Sequence[Example] = ()) -> str:
    """The text a causal LM continues to answer ``message`` (a user turn and the assistant's start).

    ``examples`` come first, each as a user turn (the cue) and the assistant's answer (the reply).
    """
    if has_template(tokenizer):
        turns = [{"role": "system", "content": SYSTEM}]
        for cue, reply in examples:
            turns += [{"role": "user", "content": cue}, {"role": "assistant", "content": reply}]
        turns.append({"role": "user", "content": message})
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
    return "".join(f"{cue}\n{reply}\n" for cue, reply in examples) + message + "\n"


PICKS = ("spread", "longest", "retrieve")


def pick_examples(
    tokenizer: Any,
    prompts: Sequence[str],
    replies: Sequence[str],
    k: int,
    max_length: int,
    how: str = "spread",
) -> list[Example]:
    """``k`` (cue, reply) turns of the user's data, cut as training cuts them, in data order.

    ``how = "spread"`` takes turns evenly spaced over the data; ``"longest"`` the turns with the longest
    replies (ties: the earlier turn), so the context carries as much of the user's own text as ``k`` turns
    can. ``"retrieve"`` keeps a pool the same way as ``"spread"`` (``k`` is then the pool's size), from
    which :func:`retrieve_examples` picks the turns for each message. The reply keeps its first
    ``max_length`` tokens, the cue its last ``max_length // 2``; the same turns for the same data every
    time (no randomness), so a test can name them.
    """
    if len(prompts) != len(replies):
        raise DataError(f"{len(prompts)} prompts for {len(replies)} replies")
    if k < 0 or max_length < 2:
        raise DataError(f"k must be >= 0 and max_length >= 2, got k={k}, max_length={max_length}")
    if how not in PICKS:
        raise DataError(f"unknown way to pick turns {how!r}; choose one of {', '.join(PICKS)}")
    n = len(replies)
    if how == "longest":  # only this pick reads every reply; "retrieve" keeps its pool spread over the data
        size = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
        chosen = sorted(sorted(range(n), key=lambda i: (-size[i], i))[:k])
    else:
        chosen = sorted({(i * n) // k for i in range(k)}) if k and n else []
    out = []
    for i in chosen:
        cue = tokenizer(prompts[i], add_special_tokens=False)["input_ids"][-(max_length // 2) :]
        reply = tokenizer(replies[i], add_special_tokens=False)["input_ids"][:max_length]
        out.append((tokenizer.decode(cue), tokenizer.decode(reply)))
    return out


def cue_tail(tokenizer: Any, cue: str, max_length: int) -> str:
    """The cue as training sees it: its last ``max_length // 2`` tokens (unchanged when shorter)."""
    ids = tokenizer(cue, add_special_tokens=False)["input_ids"]
    return cue if len(ids) <= max_length // 2 else tokenizer.decode(ids[-(max_length // 2) :])


def keep_turns(
    tokenizer: Any,
    prompts: Sequence[str],
    replies: Sequence[str],
    max_length: int,
    how: str,
    k: int,
    pool: int,
) -> list[Example]:
    """The turns a device keeps for chat: ``k`` picked by ``how``, or for ``"retrieve"`` a ``pool``."""
    return pick_examples(tokenizer, prompts, replies, pool if how == "retrieve" else k, max_length, how)


def turns_before(kept: Sequence[Example], how: str, k: int, message: str) -> list[Example]:
    """The earlier turns put before ``message``: ``k`` retrieved from the pool, or the first ``k`` kept."""
    return retrieve_examples(kept, message, k) if how == "retrieve" else list(kept[:k])


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _words(text: str) -> Counter[str]:
    return Counter(_WORD.findall(text.lower()))


def retrieve_examples(pool: Sequence[Example], message: str, k: int) -> list[Example]:
    """The ``k`` turns of ``pool`` whose words are closest to ``message``: earlier turns chosen per message.

    Similarity is the cosine of TF-IDF word vectors (lower-cased words; the document frequencies are the
    pool's own, so words every turn uses count little), over each turn's cue and reply together. The
    closest turn comes last, right before the message; ties keep the pool's order, and a message sharing
    no word with the pool gets the pool's first ``k`` turns. Runs on the device: nothing leaves it.
    """
    if k < 0:
        raise DataError(f"k must be >= 0, got {k}")
    if not k or not pool:
        return []
    docs = [_words(f"{cue} {reply}") for cue, reply in pool]
    df = Counter(w for doc in docs for w in doc)
    idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1.0 for w, n in df.items()}
    query = {w: c * idf[w] for w, c in _words(message).items() if w in idf}
    q_norm = math.sqrt(sum(v * v for v in query.values()))
    scores = []
    for doc in docs:
        vec = {w: c * idf[w] for w, c in doc.items()}
        d_norm = math.sqrt(sum(v * v for v in vec.values()))
        dot = sum(v * vec.get(w, 0.0) for w, v in query.items())
        scores.append(dot / (q_norm * d_norm) if q_norm and d_norm else 0.0)
    top = sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:k]
    return [pool[i] for i in sorted(top, key=lambda i: (scores[i], i))]


def end_of_turn(tokenizer: Any) -> list[int]:
    """The token ids that close an assistant turn (what the model must learn to stop with)."""
    if has_template(tokenizer):
        marker = "\x00reply\x00"
        turns = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": marker},
        ]
        full = str(tokenizer.apply_chat_template(turns, tokenize=False))
        tail = full[full.index(marker) + len(marker) :]
        return list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return [] if eos is None else [int(eos)]


def tokenize_turns(
    tokenizer: Any,
    prompts: Sequence[str],
    replies: Sequence[str],
    max_length: int,
    examples: Sequence[Example] = (),
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each (prompt, reply) turn and how many leading ids are the prompt (never scored).

    The reply keeps its first ``max_length`` tokens (then the end of turn); the cue inside the prompt
    keeps its last ``max_length // 2`` tokens, so the words right before the reply survive. ``examples``
    (earlier turns, see :func:`chat_prompt`) are part of every prompt, never scored.
    """
    if len(prompts) != len(replies):
        raise DataError(f"{len(prompts)} prompts for {len(replies)} replies")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    end = end_of_turn(tokenizer)
    ids, prompt_lengths = [], []
    for cue, reply in zip(prompts, replies, strict=True):
        cue = cue_tail(tokenizer, cue, max_length)
        head = tokenizer(chat_prompt(tokenizer, cue, examples), add_special_tokens=False)["input_ids"]
        body = tokenizer(reply, add_special_tokens=False)["input_ids"][:max_length] + end
        ids.append(list(head) + list(body))
        prompt_lengths.append(len(head))
    return ids, prompt_lengths
