"""The client's on-disk prefix features: exact, encrypted, keyed by weights and ids, recomputed if damaged."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY

from client.feature_cache import FeatureCache
from common import features
from common.config import Config
from common.data import load_client_data
from common.features import encode, run_prefix, store_key
from common.tasks import get_backbone
from simulations.sequential import run_sequential


@pytest.fixture
def tiny() -> tuple[Config, object, list[list[int]]]:
    cfg = Config.from_run_config(TINY)
    backbone = get_backbone(cfg)
    data = load_client_data(cfg.task, 0, 4)
    ids = backbone.tokenizer(list(data.train_texts), truncation=True, max_length=cfg.task.max_length)
    return cfg, backbone, list(ids["input_ids"])


def _no_forward(*_args: object) -> None:
    raise AssertionError("the prefix ran although its output was in the cache")


def test_a_new_process_reads_exactly_what_was_computed(tiny, tmp_path, monkeypatch) -> None:
    _, backbone, ids = tiny
    hidden, mask, order = run_prefix(backbone, ids, store=FeatureCache(tmp_path))
    (path,) = FeatureCache(tmp_path).files()
    monkeypatch.setattr(features, "_forward", _no_forward)  # a later process: nothing computed in memory
    got_hidden, got_mask, got_order = run_prefix(backbone, ids, store=FeatureCache(tmp_path))
    assert torch.equal(got_hidden, hidden) and torch.equal(got_mask, mask)
    assert got_order.tolist() == order.tolist()
    # At rest the file is ciphertext: no real token's hidden state appears in it.
    blob = path.read_bytes()
    assert hidden[0, 0].numpy().tobytes() not in blob and hidden[-1, 0].numpy().tobytes() not in blob


def test_encode_with_a_store_gives_the_same_features(tiny, tmp_path) -> None:
    cfg, backbone, _ = tiny
    data = load_client_data(cfg.task, 1, 4)
    args = (backbone, data.test_texts, data.test_labels, cfg.task.max_length)
    plain = encode(*args)
    features._CACHE.clear()
    first = encode(*args, store=FeatureCache(tmp_path))
    features._CACHE.clear()
    second = encode(*args, store=FeatureCache(tmp_path))
    for f in (first, second):
        assert torch.equal(f.hidden, plain.hidden) and torch.equal(f.labels, plain.labels)


def test_the_key_follows_the_weights_the_ids_and_the_device(tiny) -> None:
    cfg, backbone, ids = tiny
    other = get_backbone(cfg.replace(**{"model.seed": 7}))  # the tiny encoder's weights follow the seed
    cpu = torch.device("cpu")
    key = store_key(backbone, ids, cpu)
    assert key == store_key(backbone, [list(x) for x in ids], cpu)
    assert key != store_key(other, ids, cpu)
    assert key != store_key(backbone, ids[:-1], cpu)
    assert key != store_key(backbone, [ids[0][:-1], *ids[1:]], cpu)
    assert key != store_key(backbone, ids, torch.device("meta"))
    assert key != store_key(backbone, ids, cpu, chunk=16)


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-key"])
def test_a_damaged_or_foreign_file_is_recomputed_not_trusted(tiny, tmp_path, caplog, damage) -> None:
    _, backbone, ids = tiny
    hidden, _, _ = run_prefix(backbone, ids, store=FeatureCache(tmp_path))
    (path,) = FeatureCache(tmp_path).files()
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-40] ^= 0x01
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[:30]))
    else:
        (tmp_path / "cache.key").unlink()  # a new key: the old file cannot be authenticated
    with caplog.at_level(logging.WARNING, logger="flwr"):
        again, _, _ = run_prefix(backbone, ids, store=FeatureCache(tmp_path))
    assert torch.equal(again, hidden)
    assert "unreadable" in caplog.text
    assert FeatureCache(tmp_path).load(path.stem) is not None  # rewritten, readable again


def test_a_file_renamed_to_another_key_fails_authentication(tiny, tmp_path) -> None:
    _, backbone, ids = tiny
    cache = FeatureCache(tmp_path)
    run_prefix(backbone, ids, store=cache)
    (path,) = cache.files()
    other = store_key(backbone, ids[:-1], torch.device("cpu"))
    path.rename(cache.path(other))
    assert cache.load(other) is None


def test_only_the_most_recently_used_files_are_kept(tiny, tmp_path) -> None:
    _, backbone, ids = tiny
    cache = FeatureCache(tmp_path, max_files=2)
    keys = []
    for n in (3, 4, 5):
        run_prefix(backbone, ids[:n], store=cache)
        keys.append(store_key(backbone, ids[:n], torch.device("cpu")))
    assert [p.stem for p in cache.files()] == keys[1:]
    with pytest.raises(ValueError, match="max_files"):
        FeatureCache(tmp_path, max_files=0)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.path("../state")


def test_a_run_with_the_cache_matches_a_run_without_it(tmp_path) -> None:
    """Same federation three times: no cache, cache being filled, cache read; identical results."""
    run = {**TINY, "fed.num-rounds": 1, "personalization.mode": "fedavg", "dp.enabled": False}
    plain = run_sequential(run, 2, tmp_path / "plain")
    cached = {**run, "client.feature-cache": str(tmp_path / "cache")}
    features._CACHE.clear()
    filling = run_sequential(cached, 2, tmp_path / "filling")
    features._CACHE.clear()
    reading = run_sequential(cached, 2, tmp_path / "reading")
    for out in (filling, reading):
        assert out["acc-mean"] == plain["acc-mean"]
    for i in range(2):  # each client: its own folder and key, train and test features
        folder = tmp_path / "cache" / f"client-{i:04d}"
        assert len(FeatureCache(folder).files()) == 2 and (folder / "cache.key").is_file()


@pytest.mark.slow  # two Ray simulations
def test_compare_modes_share_one_cache_and_remove_it(tmp_path) -> None:
    """Real Flower simulations (Ray): the second mode reads the files the first wrote, byte for byte."""
    from simulations.compare import compare
    from simulations.run import SimSettings

    seen: dict[str, dict[str, bytes]] = {}
    cache = tmp_path / "feature-cache"

    def on_round(mode: str, _line: object) -> None:
        seen[mode] = {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.features"))}

    over = {**TINY, "fed.num-rounds": 1, "dp.enabled": False}
    rows = compare(SimSettings(num_clients=2, overrides=over), ("fedper", "local"), tmp_path, on_round)
    assert [r["mode"] for r in rows[:2]] == ["fedper", "local"]
    assert len(seen["fedper"]) == 4  # 2 clients × (train, test)
    assert seen["local"] == seen["fedper"]  # read, not recomputed (a rewrite has a new nonce)
    assert not cache.exists()
