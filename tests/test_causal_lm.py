"""The generative path on a tiny real causal LM (seeded random Llama) and real Shakespeare roles.

Same code paths as the classifier: the name-rule split, the DP training loop, the ClientApp and the
server strategy; only the model and the loss differ.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LocalGrid, describe
from opacus import GradSampleModule

from client.app import make_client_app
from client.generate import load_chat, stream
from client.predict import predict
from client.state import StateStore
from client.training import DPPlan, sample_rate, train
from common.config import Config
from common.data import load_client_data
from common.errors import ConfigError, DataError, StateError
from common.features import Features, encode
from common.shakespeare import load_roles, parse_play, split_speeches
from common.split import split_names
from common.tasks import get_backbone, get_task
from common.tasks.generate import next_token_loss, reference_losses
from research.lm_style import cross_perplexity, summarize
from server.app import run_federation

LM: dict[str, Any] = {
    "model.name": "tiny-lm",
    "model.frozen-layers": 1,
    "lora.target-modules": "q_proj,v_proj",
    "task.dataset": "shakespeare",
    "task.min-speeches": 50,
    "task.train-size": 40,
    "task.test-size": 10,
    "task.max-length": 48,
    "train.batch-size": 10,
    "train.threads": 1,
    "fed.num-rounds": 1,
    "dp.noise-multiplier": 1.0,
    "client.report-before-after": False,
}

# The diagnostics rescore on the CPU in float32; on a GPU box the clients' frozen prefix ran under bf16
# autocast (common.device), so their reported perplexities agree only to bf16 rounding there.
REL = 1e-3 if torch.cuda.is_available() else 1e-5


@pytest.fixture(scope="module")
def setup() -> tuple[Config, Any, Features]:
    cfg = Config.from_run_config(LM)
    backbone = get_backbone(cfg)
    data = load_client_data(cfg.task, 0, 2)
    return cfg, backbone, encode(backbone, data.train_texts, None, cfg.task.max_length)


def _trainable(model: torch.nn.Module, mode: str = "fedper") -> dict[str, torch.nn.Parameter]:
    roles = split_names([n for n, _ in model.named_parameters()], mode)
    for n, p in model.named_parameters():
        p.requires_grad_(n in roles["shared"] or n in roles["personal"])
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_play_parsing_keeps_speeches_and_drops_directions() -> None:
    text = "# A Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nFirst line,  \nsecond line.\n\n**B**  \nReply.\n"
    title, speeches = parse_play(text)
    assert title == "A Play"
    assert speeches == {"A": ["First line,\nsecond line."], "B": ["Reply."]}


def test_roles_of_the_real_plays_and_a_seeded_split() -> None:
    from common.assets import ensure

    roles = load_roles(ensure("shakespeare"), 50)
    assert len(roles) == 198 and roles[0].user == "hamlet/HAMLET"  # 198 roles with >= 50 speeches
    train, test = split_speeches(roles[0], 0.2, seed=3)
    assert (train, test) == split_speeches(roles[0], 0.2, seed=3)
    assert not set(train) & set(test) and len(train) + len(test) == len(roles[0].speeches)


def test_validation_split_holds_out_train_speeches_and_never_reads_test() -> None:
    base = Config.from_run_config(LM).task
    val = Config.from_run_config({**LM, "task.evaluate-on": "validation"}).task
    plain, tuned = load_client_data(base, 3, 4), load_client_data(val, 3, 4)
    assert set(tuned.train_texts) | set(tuned.test_texts) == set(plain.train_texts)
    assert not set(tuned.test_texts) & set(plain.test_texts) and len(tuned.test_texts) == 8


def test_too_few_roles_is_a_clear_error() -> None:
    cfg = Config.from_run_config({**LM, "task.min-speeches": 400})
    with pytest.raises(DataError, match="only 0 roles have >= 400 speeches"):
        load_client_data(cfg.task, 0, 1)


def test_every_trainable_tensor_gets_a_per_example_gradient_and_frozen_ones_none(
    setup: tuple[Config, Any, Features],
) -> None:
    _, backbone, feats = setup
    model = backbone.new_model()
    trainable = _trainable(model)
    assert any(n.startswith("head.") for n in trainable) and any("lora_" in n for n in trainable)
    gsm = GradSampleModule(model)
    h, m, y = feats.batch(torch.arange(6))
    reference_losses(gsm(h, m), y).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad_sample is not None and p.grad_sample.shape == (6, *p.shape), n
        else:
            assert getattr(p, "grad_sample", None) is None and p.grad is None, n


def test_dp_training_moves_every_trainable_tensor_and_no_frozen_one(
    setup: tuple[Config, Any, Features],
) -> None:
    cfg, backbone, feats = setup
    model = backbone.new_model()
    trainable = _trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = DPPlan(1.0, sample_rate(len(feats), cfg.train.batch_size), 1e-3)
    out = train(model, feats, cfg, epochs=2, plan=plan, history=[], seed=0)
    assert out.steps == 8 and out.history == [(1.0, plan.sample_rate, 8)]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_next_token_metrics_ignore_padding(setup: tuple[Config, Any, Features]) -> None:
    cfg, backbone, feats = setup
    ev = get_task(cfg).evaluate(backbone.new_model(), feats)
    acc, loss = ev.accuracy, ev.loss
    vocab = backbone.tokenizer.vocab_size
    assert 0 <= acc <= 1 and abs(loss - math.log(vocab)) < 1.0  # an untrained model: near-uniform


def test_a_federation_sends_only_shared_adapters_reports_perplexity_and_the_user_can_chat(
    tmp_path: Path, task_identity: None
) -> None:
    over = {**LM, "output.run-dir": str(tmp_path / "run1"), "client.state-root": str(tmp_path / "dev")}
    grid = LocalGrid(make_client_app(over), 2)
    run_federation(Config.from_run_config(over), grid, 7)
    template = get_backbone(Config.from_run_config(LM)).template
    roles = split_names([n for n, _ in template.named_parameters()], "fedper")
    replies = [describe(r) for r in grid.replies]
    trains = [r for r in replies if r["arrays"]]
    assert len(trains) == 2
    for r in trains:
        assert r["arrays"] == {"arrays": roles["shared"]}  # LoRA only: the personal adapter stays home
    evals = [r["metrics"]["metrics"] for r in replies if not r["arrays"]]
    assert len(evals) == 2
    for m in evals:
        assert m["perplexity"] == pytest.approx(math.exp(m["eval-loss"]))
        assert "majority-acc" not in m
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert summary["perplexity-p90"] >= summary["perplexity-median"] >= summary["perplexity-p10"] > 1
    assert "majority-mean" not in summary
    # The style diagnostic scores each user's test replies under every user's saved model: its diagonal
    # is exactly what each client reported for its own model on its own test split.
    cross = cross_perplexity(tmp_path / "dev")
    own = sorted(cross["ppl"][i][i] for i in range(2))
    assert own == pytest.approx(sorted(m["perplexity"] for m in evals), rel=REL)
    assert len(set(cross["users"])) == 2 and all(len(row) == 2 for row in cross["ppl"])
    without = cross["without-personal"]  # zeroing the trained personal part changes the user's score
    assert len(without) == 2 and all(w != cross["ppl"][i][i] for i, w in enumerate(without))
    state_dir = tmp_path / "dev" / "client-0000"
    backbone, model, turns = load_chat(state_dir)
    kept = turns.kept
    assert kept == []  # raw-text training has no turns to keep
    "".join(stream(backbone, model, "To be", chat=False, max_new_tokens=5))  # from the real state
    with pytest.raises(ConfigError, match="use `fedpers chat` or `fedpers generate`"):
        predict(state_dir, ["to be or not to be"])
    # Continual personalization: the same devices join a second run and keep composing their ε.
    eps1 = json.loads((tmp_path / "run1" / "ledger.json").read_text())["entries"]
    over2 = {**over, "output.run-dir": str(tmp_path / "run2")}
    run_federation(Config.from_run_config(over2), LocalGrid(make_client_app(over2), 2, run_id=8), 8)
    eps2 = json.loads((tmp_path / "run2" / "ledger.json").read_text())["entries"]
    first = {e["client"]: e["epsilon"] for e in eps1 if e.get("epsilon") is not None}
    second = {e["client"]: e["epsilon"] for e in eps2 if e.get("epsilon") is not None}
    assert first and all(second[c] > first[c] for c in first)


def test_chat_on_a_classifier_state_is_refused(tmp_path: Path, task_identity: None) -> None:
    from conftest import TINY

    over = {**TINY, "fed.num-rounds": 1, "train.threads": 1, "output.run-dir": str(tmp_path)}
    over["client.state-root"] = str(tmp_path / "dev")
    run_federation(Config.from_run_config(over), LocalGrid(make_client_app(over), 2), 7)
    with pytest.raises(ConfigError, match="use `fedpers predict`"):
        load_chat(tmp_path / "dev" / "client-0000")


def test_cached_greedy_generation_equals_recomputing_the_whole_sequence(
    setup: tuple[Config, Any, Features],
) -> None:
    _, backbone, _ = setup
    model = backbone.new_model().eval()
    with torch.no_grad():  # make the personal adapter non-trivial
        model.head.up.weight.normal_(0, 0.5)
    tok = backbone.tokenizer
    ids = tok("my lord the king", return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = []
    with torch.no_grad():
        seq = ids
        for _ in range(6):
            logits = model(backbone.prefix(seq, torch.ones_like(seq)), torch.ones_like(seq))
            nxt = int(logits[0, -1].argmax())
            expected.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    text = "".join(stream(backbone, model, "my lord the king", chat=False, max_new_tokens=6, temperature=0))
    eos = {tok.eos_token_id, tok.sep_token_id}
    cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert text == tok.decode(expected[:cut], skip_special_tokens=True)


def _assert_dp_moves_exactly_the_trainable(model: torch.nn.Module, feats: Features, cfg: Config) -> None:
    """One DP epoch in fedper changes every trainable (shared or personal) tensor and no frozen one."""
    trainable = _trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = DPPlan(1.0, sample_rate(len(feats), cfg.train.batch_size), 1e-3)
    train(model, feats, cfg, epochs=1, plan=plan, history=[], seed=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_last_block_as_the_personal_part(setup: tuple[Config, Any, Features]) -> None:
    """model.personal-part = last-block: the last block's LoRA is personal, the others' LoRA shared."""
    _, _, feats = setup
    cfg = Config.from_run_config({**LM, "model.personal-part": "last-block"})
    backbone = get_backbone(cfg)
    model = backbone.new_model()
    roles = split_names([n for n, _ in model.named_parameters()], "fedper")
    assert roles["personal"] and all(n.startswith("head.") and "lora_" in n for n in roles["personal"])
    assert roles["shared"] and all(n.startswith("body.") for n in roles["shared"])
    _assert_dp_moves_exactly_the_trainable(model, feats, cfg)
    with pytest.raises(Exception, match="leaves no block for the shared LoRA"):
        get_backbone(
            Config.from_run_config({**LM, "model.personal-part": "last-block", "model.frozen-layers": 2})
        )


def test_bias_as_the_personal_part(setup: tuple[Config, Any, Features]) -> None:
    """model.personal-part = bias: one hidden-size offset is personal; DP moves it and every LoRA tensor."""
    _, _, feats = setup
    cfg = Config.from_run_config({**LM, "model.personal-part": "bias"})
    backbone = get_backbone(cfg)
    model = backbone.new_model()
    roles = split_names([n for n, _ in model.named_parameters()], "fedper")
    assert roles["personal"] == ["head.shift.weight"]
    assert roles["shared"] and all(n.startswith("body.") and "lora_" in n for n in roles["shared"])
    hidden = model.head.shift.weight.shape[0]
    assert model.head.shift.weight.shape == (hidden, 1) and not model.head.shift.weight.any()
    _assert_dp_moves_exactly_the_trainable(model, feats, cfg)
    # the offset is added to the hidden state at every position
    x = torch.randn(2, 3, hidden)
    with torch.no_grad():
        model.head.shift.weight.copy_(torch.randn(hidden, 1))
        assert torch.allclose(model.head(x), x + model.head.shift.weight[:, 0])
    # Opacus' per-example gradient of the offset equals each example's own gradient (sum reduction, as
    # client.training uses)
    gsm = GradSampleModule(model, loss_reduction="sum")
    h, m, y = feats.batch(torch.arange(3))
    reference_losses(gsm(h, m), y).sum().backward()
    per_example = model.head.shift.weight.grad_sample.clone()
    gsm._close()  # plain backward passes from here on
    for i in range(3):
        model.zero_grad()
        reference_losses(model(h[i : i + 1], m[i : i + 1]), y[i : i + 1]).sum().backward()
        assert torch.allclose(per_example[i], model.head.shift.weight.grad, atol=1e-6), i


def test_style_summary_counts_own_model_wins_and_same_play_gaps() -> None:
    users = ["a/X", "a/Y", "b/Z"]
    ppl = [[10.0, 30.0, 20.0], [20.0, 15.0, 40.0], [20.0, 30.0, 20.0]]  # column j: user j's replies
    s = summarize(users, ppl, without=[12.0, 14.0, 25.0])
    assert s["personal-helps"] == 2 and s["without-personal-mean"] == pytest.approx(17.0)
    rows = [math.sqrt(30 * 20), math.sqrt(20 * 40), math.sqrt(20 * 30)]  # each row without its diagonal
    assert s["model-spread-pct"] == pytest.approx(100 * (max(rows) / min(rows) - 1))
    assert s["own-model-wins"] == 2  # Z's replies fit X's model as well as Z's own: a tie is no win
    assert s["same-play-pairs"] == 2 and s["same-play-own-better"] == 2
    gap_x, gap_y = math.log(20 / 10), math.log(30 / 15)  # the other a-user's model against the own one
    assert s["same-play-mean-gap-pct"] == pytest.approx(100 * (math.exp((gap_x + gap_y) / 2) - 1))


def test_style_diagnostic_on_a_folder_without_states_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="has no client state"):
        cross_perplexity(tmp_path)


def test_a_chat_user_keeps_own_turns_in_the_state_and_chat_uses_them(tmp_path: Path) -> None:
    """A real (sequential) chat-turn run: the state keeps the picked turns; chat puts them first."""
    from typer.testing import CliRunner

    from cli.main import app
    from common.chat_format import pick_examples
    from simulations.sequential import run_sequential

    over = {**LM, "task.lm-format": "chat", "client.chat-examples": 3, "client.chat-pick": "longest"}
    over["dp.enabled"] = False
    reported = run_sequential(over, 2, tmp_path)
    cfg = Config.from_run_config(over)
    state_dir = tmp_path / "clients" / "client-0001"
    state = StateStore(state_dir).load()
    data = load_client_data(cfg.task, 1, 2)
    tok = get_backbone(cfg).tokenizer
    assert state is not None
    n = cfg.task.max_length
    assert state.examples == pick_examples(tok, data.train_prompts, data.train_texts, 3, n, "longest")
    assert state.examples != pick_examples(tok, data.train_prompts, data.train_texts, 3, n, "spread")
    backbone, model, turns = load_chat(state_dir)
    kept = turns.kept
    assert kept == state.examples
    assert "".join(stream(backbone, model, "hail", max_new_tokens=4, temperature=0.0, examples=kept))
    with pytest.raises(ConfigError, match="need the chat format"):
        next(stream(backbone, model, "hail", chat=False, examples=kept))
    res = CliRunner().invoke(app, ["chat", "--state-dir", str(state_dir), "--examples", "4"], input="hail\n")
    assert res.exit_code != 0 and "keeps 3 of this user's turns" in res.output
    res = CliRunner().invoke(
        app,
        ["chat", "--state-dir", str(state_dir), "--examples", "2", "--max-new-tokens", "3"],
        input="hail\n",
    )
    assert res.exit_code == 0 and res.stdout.startswith("> ")
    args = ["chat", "--state-dir", str(state_dir), "--max-new-tokens", "3", "--contrast", "1"]
    assert CliRunner().invoke(app, args, input="hail\n").exit_code == 0
    res = CliRunner().invoke(app, [*args, "--examples", "0"], input="hail\n")
    assert res.exit_code != 0 and "needs turns before the message" in res.output
    # The context diagnostic: without turns it scores exactly what the client reported for its test split.
    from research.lm_context import context_perplexity, context_sweep

    result = context_perplexity(tmp_path / "clients", 3)
    rows = result["rows"]
    sweep = context_sweep(tmp_path / "clients", [("spread", 3), ("longest", 1)])
    assert sweep[0]["rows"] == result["rows"] and [s["examples"] for s in sweep] == [3, 1]
    assert [r["none"] for r in sweep[1]["rows"]] == [r["none"] for r in rows]
    assert all(r["context-tokens"] > 0 for one in sweep for r in one["rows"])
    assert [r["user"] for r in rows] == [r["other"] for r in rows[::-1]]  # two users borrow each other's
    assert statistics.fmean(r["none"] for r in rows) == pytest.approx(reported["perplexity-mean"], rel=REL)
    assert all(r["own"] != r["none"] and math.isfinite(r["other-turns"]) for r in rows)
    assert result["summary"]["users"] == 2
    # Context-aware decoding scored: a = 0 is the plain own / other perplexity, a > 0 another distribution.
    from research.context_scoring import contrast_losses, encode_turns
    from research.lm_context import table

    contrasted = context_sweep(tmp_path / "clients", [("spread", 3)], contrasts=(0.0, 2.0))[0]
    for row, plain in zip(contrasted["rows"], rows, strict=True):  # a = 0: the own turns' perplexity
        assert row["own-contrast"][0] == pytest.approx(plain["own"], rel=0.05)  # (on the tokens both score)
        assert row["own-contrast"][1] != pytest.approx(row["own-contrast"][0], rel=1e-3)
    assert [c["contrast"] for c in contrasted["summary"]["contrast"]] == [0.0, 2.0]
    assert "| spread | 3 | 2 |" in table([contrasted])
    shots = [kept] * len(data.test_texts)
    turned = encode_turns(backbone, data.test_texts, 16, data.test_prompts, shots)
    plain_loss = next_token_loss(model, turned)  # with itself as "without", every a gives the plain loss
    assert contrast_losses(model, turned, [turned], [0.0, 3.0])[0] == pytest.approx(
        [plain_loss] * 2, rel=1e-5
    )
    half = encode(backbone, data.test_texts[:2], None, 16, prompts=data.test_prompts[:2])
    full = encode(backbone, data.test_texts, None, 16, prompts=data.test_prompts)
    with pytest.raises(DataError, match="same examples"):
        contrast_losses(model, full, [half], [1.0])
    with pytest.raises(ConfigError, match="finite numbers >= 0"):
        contrast_losses(model, full, [full], [-1.0])
    with pytest.raises(DataError, match="give prompts too"):
        encode(backbone, data.test_texts, None, 16, examples=kept)


def test_retrieving_turns_keeps_a_pool_and_picks_per_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """chat-pick = retrieve: the state keeps chat-pool turns; chat and the diagnostic pick per message."""
    from typer.testing import CliRunner

    from cli.main import app
    from common.chat_format import pick_examples, retrieve_examples
    from research.lm_context import context_sweep, main, scored_turns
    from simulations.sequential import run_sequential

    over = {**LM, "task.lm-format": "chat", "client.chat-pick": "retrieve", "client.chat-pool": 6}
    over.update({"client.chat-examples": 2, "dp.enabled": False})
    run_sequential(over, 2, tmp_path)
    cfg = Config.from_run_config(over)
    state_dir = tmp_path / "clients" / "client-0001"
    data = load_client_data(cfg.task, 1, 2)
    tok = get_backbone(cfg).tokenizer
    pool = pick_examples(tok, data.train_prompts, data.train_texts, 6, cfg.task.max_length, "retrieve")
    _, _, turns = load_chat(state_dir)
    assert (turns.kept, turns.how, turns.k) == (pool, "retrieve", 2) and len(pool) == 6
    message = pool[4][1]  # a kept reply's own words bring that turn, right before the message
    assert turns.for_message(message)[-1] == pool[4]
    assert turns.for_message(message) == retrieve_examples(pool, message, 2)
    res = CliRunner().invoke(
        app,
        ["chat", "--state-dir", str(state_dir), "--examples", "1", "--max-new-tokens", "3"],
        input="hail\n",
    )
    assert res.exit_code == 0 and res.stdout.startswith("> ")
    sweep = context_sweep(tmp_path / "clients", [("retrieve", 2), ("spread", 2), ("scored", 2)])
    assert [r["none"] for r in sweep[0]["rows"]] == [r["none"] for r in sweep[1]["rows"]]
    assert [r["none"] for r in sweep[2]["rows"]] == [r["none"] for r in sweep[1]["rows"]]
    assert all(r["own"] != r["none"] and math.isfinite(r["other-turns"]) for r in sweep[2]["rows"])
    # The scored diagnostic keeps k of the 16 longest turns, in data order; with k = 16 it keeps them all.
    backbone, model, _ = load_chat(state_dir)
    n = cfg.task.max_length
    longest = pick_examples(tok, data.train_prompts, data.train_texts, 16, n, "longest")
    picked = scored_turns(model, backbone, n, data, 3)
    assert len(picked) == 3 and set(picked) <= set(longest)
    assert sorted(picked, key=longest.index) == picked
    assert scored_turns(model, backbone, n, data, 16) == longest
    with pytest.raises(StateError, match="too few to score"):
        scored_turns(model, backbone, n, data, 2, candidates=16, probes=len(data.train_texts))
    assert all(r["own"] != r["none"] and r["context-tokens"] > 0 for r in sweep[0]["rows"])
    out = tmp_path / "sweep.json"  # the command line: a sweep, its table, and the table again from the JSON
    main(
        ["--run-dir", str(tmp_path.parent), "--mode", tmp_path.name, "--examples", "1,2", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert [(s["pick"], s["examples"]) for s in json.loads(out.read_text())["sweep"]] == [
        ("spread", 1),
        ("spread", 2),
    ]
    main(["--report", str(out)])
    report = capsys.readouterr().out.strip()
    assert "| spread | 2 |" in report and printed.rstrip().endswith(report)
    with pytest.raises(SystemExit, match="--pick takes"):
        main(["--run-dir", str(tmp_path.parent), "--mode", tmp_path.name, "--pick", "best"])
