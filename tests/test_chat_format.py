"""Chat-turn training (task.lm-format = "chat"): cue → reply pairs, only the reply scored, chat's prompt."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from client.generate import ChatTurns, stream
from common.assets import ensure
from common.chat_format import chat_prompt, end_of_turn, pick_examples, retrieve_examples, tokenize_turns
from common.config import Config
from common.data import load_client_data
from common.errors import ConfigError, DataError
from common.features import encode
from common.shakespeare import parse_turns
from common.tasks import get_backbone, get_task
from common.tasks.generate import reference_losses
from research.context_scoring import encode_turns, turn_ids

CHAT: dict[str, Any] = {
    "model.name": "tiny-lm",
    "model.frozen-layers": 1,
    "lora.target-modules": "q_proj,v_proj",
    "task.dataset": "shakespeare",
    "task.lm-format": "chat",
    "task.min-speeches": 50,
    "task.train-size": 40,
    "task.test-size": 10,
    "task.max-length": 32,
}


@pytest.fixture(scope="module")
def chat() -> tuple[Config, Any, Any]:
    cfg = Config.from_run_config(CHAT)
    return cfg, get_backbone(cfg), load_client_data(cfg.task, 1, 4)


def test_a_cue_is_the_speech_before_in_the_same_scene() -> None:
    text = (
        "# P\n\n## ACT I\n\n**A**\nHello.\n\n**B**\nHi.\n\n_Exit B_\n\n**A**\nBye.\n\n"
        "### SCENE II\n\n**B**\nAlone.\n"
    )
    _, turns = parse_turns(text)
    assert turns == {"A": [("", "Hello."), ("Hi.", "Bye.")], "B": [("Hello.", "Hi."), ("", "Alone.")]}


def test_chat_data_pairs_each_speech_with_its_cue_from_the_play(chat: tuple[Config, Any, Any]) -> None:
    _, _, data = chat
    play, speaker = data.user.split("/")
    source = next(Path(ensure("shakespeare")).rglob(f"{play}.md"))
    pairs = set(parse_turns(source.read_text(encoding="utf-8"))[1][speaker])
    for prompts, texts in ((data.train_prompts, data.train_texts), (data.test_prompts, data.test_texts)):
        assert len(prompts) == len(texts) and set(zip(prompts, texts, strict=True)) <= pairs
    assert sum(bool(p) for p in data.train_prompts) > len(data.train_prompts) // 2
    plain = load_client_data(Config.from_run_config({**CHAT, "task.lm-format": "text"}).task, 1, 4)
    assert plain.train_texts == data.train_texts and plain.train_prompts == ()  # same speeches, no cues


def test_only_the_reply_and_its_end_of_turn_are_scored(chat: tuple[Config, Any, Any]) -> None:
    cfg, backbone, data = chat
    tok, n = backbone.tokenizer, cfg.task.max_length
    feats = encode(backbone, data.train_texts, None, n, prompts=data.train_prompts)
    ids, heads = tokenize_turns(tok, data.train_prompts, data.train_texts, n)
    end = end_of_turn(tok)
    assert end == [tok.sep_token_id]  # no chat template: the end-of-sequence token closes the turn
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    for row in range(len(feats)):
        valid = feats.mask[row].sum().item()
        scored = feats.labels[row][feats.labels[row] != -100].tolist()
        matches = [i for i in by_length[valid] if ids[i][heads[i] :] == scored]
        assert matches, "the scored tokens of every row are exactly one reply + end of turn"
        i = matches[0]
        assert (feats.labels[row][: heads[i]] == -100).all() and feats.mask[row][: heads[i]].all()
        assert scored[-len(end) :] == end and len(scored) - len(end) <= n
        cue = data.train_prompts[i]
        if len(tok(cue, add_special_tokens=False)["input_ids"]) <= n // 2:  # longer cues keep their tail
            assert ids[i][: heads[i]] == tok(chat_prompt(tok, cue), add_special_tokens=False)["input_ids"]


def test_the_cue_is_attended_but_not_scored(chat: tuple[Config, Any, Any]) -> None:
    cfg, backbone, data = chat
    model = backbone.new_model().eval()
    texts = data.train_texts[:8]
    cues = encode(backbone, texts, None, cfg.task.max_length, prompts=data.train_prompts[:8])
    other = encode(backbone, texts, None, cfg.task.max_length, prompts=["Who is there?"] * 8)
    a, b = (reference_losses(model(*f.batch(slice(None))[:2]), f.labels) for f in (cues, other))
    counts = [sorted((f.labels != -100).sum(1).tolist()) for f in (cues, other)]
    assert counts[0] == counts[1]  # the same reply tokens are scored
    assert not torch.allclose(torch.sort(a).values, torch.sort(b).values)  # … given a different cue


def test_chat_asks_with_the_prompt_training_used(chat: tuple[Config, Any, Any]) -> None:
    cfg, backbone, _ = chat
    torch.manual_seed(0)
    model = backbone.new_model().eval()
    with torch.no_grad():
        model.head.up.weight.normal_(0, 0.5)  # an untrained-looking but non-trivial personal part
    cue = "What say you, my lord?"
    ids, heads = tokenize_turns(backbone.tokenizer, [cue], ["x"], cfg.task.max_length)
    head = torch.tensor([ids[0][: heads[0]]])
    mask = torch.ones_like(head)
    with torch.no_grad():
        greedy = int(model(backbone.prefix(head, mask), mask)[0, -1].argmax())
    first = next(stream(backbone, model, cue, chat=True, max_new_tokens=1, temperature=0.0))
    assert first.strip() == backbone.tokenizer.decode([greedy]).strip()


def test_contrast_draws_from_the_amplified_difference_the_turns_make(chat: tuple[Config, Any, Any]) -> None:
    _, backbone, _ = chat
    torch.manual_seed(0)
    model = backbone.new_model().eval()
    with torch.no_grad():
        model.head.up.weight.normal_(0, 0.5)
    tok = backbone.tokenizer
    turns = [
        ("Who goes there?", "Nay, answer me: stand and unfold yourself."),
        ("Long live the king!", "Peace!"),
    ]
    cue = "What say you, my lord?"

    def last_logits(shots: list[tuple[str, str]]) -> torch.Tensor:
        ids = tok(chat_prompt(tok, cue, shots), return_tensors="pt", add_special_tokens=False)["input_ids"]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            return model(backbone.prefix(ids, mask), mask)[0, -1]

    with_turns, without = last_logits(turns), last_logits([])
    firsts = set()
    for a in (0.0, 1.0, 4.0):
        expected = int(((1 + a) * with_turns - a * without).argmax())
        answer = stream(backbone, model, cue, max_new_tokens=1, temperature=0.0, examples=turns, contrast=a)
        first = next(answer)
        assert first.strip() == tok.decode([expected]).strip()
        firsts.add(expected)
    assert len(firsts) > 1  # the contrast changed the choice, so the check above can tell them apart
    with pytest.raises(ConfigError, match="finite number >= 0"):
        next(stream(backbone, model, cue, examples=turns, contrast=-0.5))
    with pytest.raises(ConfigError, match="needs turns"):
        next(stream(backbone, model, cue, contrast=1.0))


def _templated() -> Any:
    """The tiny LM's tokenizer with a minimal, readable chat template."""
    tok = copy.deepcopy(get_backbone(Config.from_run_config(CHAT)).tokenizer)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end] {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    return tok


def test_a_chat_template_sets_the_prompt_and_the_end_of_turn() -> None:
    tok = _templated()
    assert chat_prompt(tok, "hail") == "[system]  [end] [user] hail [end] [assistant] "
    assert tok.decode(end_of_turn(tok)).replace(" ", "") == "[end]"
    ids, heads = tokenize_turns(tok, ["hail"], ["well met"], 16)
    assert tok.decode(ids[0][heads[0] :]).replace(" ", "") == "wellmet[end]"


def test_chat_format_needs_a_causal_lm_and_text() -> None:
    with pytest.raises(ConfigError, match="task.lm-format = 'chat' needs a text dataset"):
        Config.from_run_config({"task.lm-format": "chat"})
    with pytest.raises(ConfigError, match="does not fit task.dataset"):
        Config.from_run_config({"model.name": "tiny-lm"})
    with pytest.raises(ConfigError, match="does not fit task.dataset"):
        Config.from_run_config({"task.dataset": "shakespeare"})


def test_projecting_only_scored_positions_equals_the_full_logits(chat: tuple[Config, Any, Any]) -> None:
    from opacus import GradSampleModule

    cfg, backbone, data = chat
    torch.manual_seed(1)
    for prompts in (data.train_prompts[:6], ()):
        feats = encode(backbone, data.train_texts[:6], None, cfg.task.max_length, prompts=prompts)
        h, m, y = feats.batch(slice(None))
        model = backbone.new_model()
        with torch.no_grad():
            model.head.up.weight.normal_(0, 0.3)
        grads = []
        for selected in (True, False):
            gsm = GradSampleModule(model)
            losses = get_task(cfg).losses(gsm, h, m, y) if selected else reference_losses(gsm(h, m), y)
            losses.sum().backward()
            grads.append(
                (losses.detach(), [p.grad_sample.clone() for p in model.parameters() if p.requires_grad])
            )
            for p in model.parameters():
                p.grad_sample, p.grad = None, None
            gsm._close()
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1], strict=True))


def test_example_turns_come_before_the_message_and_are_never_scored() -> None:
    cfg = Config.from_run_config(CHAT)
    tok = _templated()
    shots = [("who goes", "a friend")]
    assert chat_prompt(tok, "hail", shots) == (
        "[system]  [end] [user] who goes [end] [assistant] a friend [end] [user] hail [end] [assistant] "
    )
    plain, plain_heads = tokenize_turns(tok, ["hail"], ["well met"], 16)
    ids, heads = tokenize_turns(tok, ["hail"], ["well met"], 16, shots)
    assert heads[0] > plain_heads[0] and ids[0][heads[0] :] == plain[0][plain_heads[0] :]
    no_template = get_backbone(cfg).tokenizer  # the tiny LM has none: plain lines
    assert chat_prompt(no_template, "hail", shots) == "who goes\na friend\nhail\n"


def test_example_turns_are_spread_over_the_data_and_cut_like_training(chat: tuple[Config, Any, Any]) -> None:
    cfg, backbone, data = chat
    tok, n = backbone.tokenizer, cfg.task.max_length
    shots = pick_examples(tok, data.train_prompts, data.train_texts, 4, n)
    assert pick_examples(tok, data.train_prompts, data.train_texts, 4, n) == shots  # deterministic
    m = len(data.train_texts)
    for (cue, reply), i in zip(shots, [0, m // 4, m // 2, 3 * m // 4], strict=True):
        assert (
            reply.strip()
            and tok.decode(tok(data.train_texts[i], add_special_tokens=False)["input_ids"][:n]) == reply
        )
        assert cue == tok.decode(
            tok(data.train_prompts[i], add_special_tokens=False)["input_ids"][-(n // 2) :]
        )
    assert len(pick_examples(tok, data.train_prompts[:2], data.train_texts[:2], 5, n)) == 2
    assert pick_examples(tok, data.train_prompts, data.train_texts, 0, n) == []
    with pytest.raises(DataError, match="prompts for"):
        pick_examples(tok, data.train_prompts[:1], data.train_texts, 2, n)


def test_longest_pick_takes_the_longest_replies_in_data_order(chat: tuple[Config, Any, Any]) -> None:
    cfg, backbone, data = chat
    tok, n = backbone.tokenizer, cfg.task.max_length
    sizes = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in data.train_texts]
    shots = pick_examples(tok, data.train_prompts, data.train_texts, 3, n, "longest")
    want = sorted(sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))[:3])
    assert [reply for _, reply in shots] == [
        tok.decode(tok(data.train_texts[i], add_special_tokens=False)["input_ids"][:n]) for i in want
    ]
    assert min(sizes[i] for i in want) >= max(s for i, s in enumerate(sizes) if i not in want)
    spread = pick_examples(tok, data.train_prompts, data.train_texts, 3, n)
    assert sum(len(tok(r)["input_ids"]) for _, r in shots) >= sum(len(tok(r)["input_ids"]) for _, r in spread)
    with pytest.raises(DataError, match="unknown way to pick turns 'best'"):
        pick_examples(tok, data.train_prompts, data.train_texts, 3, n, "best")


def test_retrieval_puts_the_turns_closest_to_the_message_last_and_never_guesses() -> None:
    pool = [
        ("Who comes there?", "A friend to this ground."),
        ("What of Desdemona?", "My gentle Desdemona, my soul's joy."),
        ("How now, Iago?", "Honest Iago, speak thy mind."),
        ("What of the Moor?", "The Moor is of a free and open nature, like Desdemona."),
    ]
    assert retrieve_examples(pool, "Tell me of Desdemona", 2) == [pool[3], pool[1]]  # closest last
    assert retrieve_examples(pool, "Honest IAGO!", 1) == [pool[2]]  # case-blind words
    assert retrieve_examples(pool, "zebra", 2) == pool[:2]  # no shared word: the pool's order
    assert retrieve_examples(pool, "Desdemona", 9) == [pool[0], pool[2], pool[3], pool[1]]
    assert retrieve_examples(pool, "anything", 0) == [] and retrieve_examples([], "Desdemona", 3) == []
    with pytest.raises(DataError, match="k must be >= 0"):
        retrieve_examples(pool, "Desdemona", -1)
    turns = ChatTurns(pool, "retrieve", 1)
    assert turns.for_message("my soul's joy") == [pool[1]]
    assert turns.limit(0).for_message("Desdemona") == [] and turns.limit(-1) == turns
    assert ChatTurns(pool, "spread", 4).limit(2).for_message("Desdemona") == pool[:2]  # fixed turns
    with pytest.raises(ConfigError, match="keeps 4 of this user's turns"):
        turns.limit(5)


def test_each_turn_can_have_its_own_earlier_turns(chat: tuple[Config, Any, Any]) -> None:
    cfg, backbone, data = chat
    tok, n = backbone.tokenizer, cfg.task.max_length
    prompts, replies = data.train_prompts[:3], data.train_texts[:3]
    pool = pick_examples(tok, data.train_prompts[3:], data.train_texts[3:], 6, n, "retrieve")
    contexts = [retrieve_examples(pool, cue, 2) for cue in prompts]
    ids, heads = turn_ids(tok, prompts, replies, n, contexts)
    for i, context in enumerate(contexts):  # the same tokens as one turn with its context shared
        one, one_head = tokenize_turns(tok, prompts[i : i + 1], replies[i : i + 1], n, context)
        assert (ids[i], heads[i]) == (one[0], one_head[0])
    with pytest.raises(DataError, match="one context per turn"):
        turn_ids(tok, prompts, replies, n, contexts[:2])
    feats = encode_turns(backbone, replies, n, prompts, contexts)
    assert int(feats.mask.sum()) == sum(map(len, ids))  # each turn ran with its own context
    bare = encode_turns(backbone, replies, n, prompts, [[]] * 3)
    assert int(bare.mask.sum()) == sum(map(len, tokenize_turns(tok, prompts, replies, n)[0]))
    plain = encode(backbone, replies, None, n, prompts=prompts)  # no turns: what encode gives
    assert torch.equal(bare.labels, plain.labels) and torch.equal(bare.source, plain.source)
