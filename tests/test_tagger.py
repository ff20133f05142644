"""The third task, named-entity tagging, on the tiny real encoder and the real WNUT-16 tweets.

The same code paths as the other tasks (name-rule split, DP training loop, node, strategy, predict);
only the task object differs: a tag per word, scored at the word's first sub-word token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY
from opacus import GradSampleModule
from typer.testing import CliRunner

from cli.main import app
from client.node import NodeInfo, run_evaluate, run_train
from client.predict import predict
from client.training import DPPlan, sample_rate, train
from common import protocol as P
from common.config import Config
from common.errors import ConfigError
from common.ner_data import TAG_NAMES
from common.params import get_arrays
from common.split import split_names
from common.tasks import get_task
from common.tasks.tag import Tagged, first_tokens, word_ids, words_of
from simulations.sequential import run_sequential

NER: dict[str, Any] = {
    **{k: v for k, v in TINY.items() if not k.startswith("task.")},
    "task.dataset": "wnut16",
    "task.train-size": 24,
    "task.test-size": 12,
    "task.max-length": 48,
    "fed.num-rounds": 1,
}


@pytest.fixture(scope="module")
def setup() -> tuple[Config, Any, Any]:
    cfg = Config.from_run_config(NER)
    task = get_task(cfg)
    return cfg, task, task.load(2, 10)


def test_each_word_is_scored_once_at_its_first_token_with_its_own_tag(setup: tuple[Config, Any, Any]) -> None:
    cfg, task, data = setup
    backbone = task.backbone()
    feats = task.features(backbone, data, "train")
    ids, owners = word_ids(backbone, data.train_words, cfg.task.max_length)
    for row, i in enumerate(feats.source.tolist()):
        firsts = first_tokens(owners[i])
        scored = (feats.labels[row] != -100).nonzero().flatten().tolist()
        assert scored == [pos for pos, _ in firsts]  # special tokens, later sub-words and padding: never
        assert feats.labels[row, scored].tolist() == [data.train_tags[i][w] for _, w in firsts]
    assert len(TAG_NAMES) == 21 and backbone.template.head.out_features == 21


def test_per_example_losses_are_what_dp_sgd_clips(setup: tuple[Config, Any, Any]) -> None:
    """One loss per tweet (its mean over scored words); per-sample gradients equal one-by-one gradients."""
    _, task, data = setup
    backbone = task.backbone()
    feats = task.features(backbone, data, "train")
    model = backbone.new_model()
    h, m, y = feats.batch(slice(0, 4))
    losses = task.losses(model, h, m, y)
    assert losses.shape == (4,)
    gsm = GradSampleModule(model, loss_reduction="sum")
    task.losses(gsm, h, m, y).sum().backward()
    head = model.head.weight
    batched = head.grad_sample.clone()
    gsm._close()
    for i in range(4):
        model.zero_grad(set_to_none=True)
        task.losses(model, h[i : i + 1], m[i : i + 1], y[i : i + 1]).sum().backward()
        assert torch.allclose(batched[i], head.grad, atol=1e-6)


def test_dp_moves_every_trainable_tensor_and_no_frozen_one(setup: tuple[Config, Any, Any]) -> None:
    cfg, task, data = setup
    backbone = task.backbone()
    feats = task.features(backbone, data, "train")
    model = backbone.new_model()
    roles = split_names([n for n, _ in model.named_parameters()], "fedper")
    assert set(roles["personal"]) == {"head.weight", "head.bias"}  # the token head stays on the device
    trainable = set(roles["shared"]) | set(roles["personal"])
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = DPPlan(1.0, sample_rate(len(feats), cfg.train.batch_size), 1e-3)
    out = train(model, feats, cfg, epochs=1, plan=plan, history=[], seed=0)
    assert out.history and out.steps > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


class _Oracle(torch.nn.Module):
    """Logits that put all mass on given tags: what a perfect (or a deliberately wrong) tagger outputs."""

    def __init__(self, tags: torch.Tensor) -> None:
        super().__init__()
        self.tags = tags

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (
            torch.nn.functional.one_hot(self.tags[:, : hidden.shape[1]].clamp(min=0), len(TAG_NAMES)) * 50.0
        )


def test_entity_f1_is_exact_span_match(setup: tuple[Config, Any, Any]) -> None:
    _, task, data = setup
    feats = task.features(task.backbone(), data, "test")
    perfect = task.evaluate(_Oracle(feats.labels), feats)
    assert perfect.accuracy == 1.0 and perfect.metrics[P.ENTITY_F1] == 1.0
    outside = task.evaluate(_Oracle(torch.zeros_like(feats.labels)), feats)  # "O" everywhere
    assert outside.metrics[P.ENTITY_F1] == 0.0 and 0 < outside.accuracy < 1


def test_a_node_sends_only_the_shared_adapters_and_reports_entity_f1(tmp_path: Path) -> None:
    cfg = Config.from_run_config(NER)
    template = get_task(cfg).backbone().template
    shared = get_arrays(
        template, split_names([n for n, _ in template.named_parameters()], "fedper")["shared"]
    )
    out, metrics = run_train(cfg, NodeInfo(1, 10, tmp_path, run_id=1), shared, 1)
    assert set(out) == set(shared) and not any(k.startswith("head.") for k in out)
    assert P.EPSILON in metrics and P.MAJORITY_F1 not in metrics  # the baseline comes with evaluations
    ev = run_evaluate(cfg, NodeInfo(1, 10, tmp_path, run_id=1), out, final_round=True)
    assert 0 <= ev[P.ENTITY_F1] <= 1 and 0 <= ev[P.EVAL_ACC] <= 1 and 0 <= ev[P.MAJORITY_F1] <= 1


def test_a_simulated_federation_and_predict_print_tagged_spans(tmp_path: Path) -> None:
    summary = run_sequential(NER, 5, tmp_path)
    assert len(summary["clients"]) == 5 and all(0 <= c["f1"] <= 1 for c in summary["clients"])
    state = tmp_path / "clients" / "client-0002"
    results = predict(state, ["I love New York and @paulwalk in Sydney!"])
    assert isinstance(results[0], Tagged)
    assert results[0].words == ("I", "love", "New", "York", "and", "@paulwalk", "in", "Sydney", "!")
    assert len(results[0].tags) == len(results[0].words)
    res = CliRunner().invoke(
        app, ["predict", "--state-dir", str(state), "Apple releases the iPhone in Paris"]
    )
    assert res.exit_code == 0 and "entities" in res.output and "Apple releases the iPhone" in res.output
    res = CliRunner().invoke(app, ["chat", "--state-dir", str(state)])
    assert res.exit_code == 2 and "use `fedpers predict`" in res.output


def test_words_are_cut_as_the_corpus_cuts_them() -> None:
    assert words_of("RT @paulwalk: see http://t.co/x1 #wow, it's 5.30!") == [
        "RT", "@paulwalk", ":", "see", "http://t.co/x1", "#wow", ",", "it's", "5.30", "!",
    ]  # fmt: skip


def test_config_mistakes_of_the_tagger_fail_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="ghost"):
        Config.from_run_config({**NER, "dp.grad-sample-mode": "ghost"})
    with pytest.raises(ConfigError, match="task.dirichlet-alpha"):
        Config.from_run_config({**NER, "task.dirichlet-alpha": 0.7})
    with pytest.raises(ConfigError, match="does not fit"):
        Config.from_run_config({**NER, "model.name": "tiny-lm", "lora.target-modules": "q_proj,v_proj"})
