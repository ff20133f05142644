"""The encrypted on-device personal state, and a client restart through real train/evaluate rounds."""

from __future__ import annotations

import os
import secrets
import stat
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

import common.backbone
import common.features
from client.node import NodeInfo, run_evaluate, run_train
from client.state import KEY_ENV, MAGIC, STATE_FILE, PersonalState, StateStore
from common import protocol as P
from common.config import MODES, Config
from common.data import load_client_data
from common.errors import StateError
from common.features import encode
from common.params import get_arrays, set_arrays
from common.split import split_names
from common.tasks import get_backbone, get_task


def _state() -> PersonalState:
    rng = np.random.default_rng(0)
    return PersonalState(
        tensors={
            "head.weight": rng.standard_normal((3, 64)).astype(np.float32),
            "head.bias": rng.standard_normal(3).astype(np.float32),
            "body.base_model.model.layers.0.attention.self.query.lora_B.default.weight": rng.standard_normal(
                (64, 8)
            ).astype(np.float32),
            "extra.f64": rng.standard_normal((2, 2)),
            "extra.int": np.arange(5, dtype=np.int64),
        },
        history=[(0.7, 1 / 3, 9), (1.25, 0.25, 4)],
        rounds_trained=3,
        examples_seen=180,
        run_plan={"run_id": 12, "sigma": 0.7, "sample_rate": 1 / 3, "delta": 1 / 60},
        meta={"mode": "fedper", "model": "abc123"},
        examples=[
            ("Who's there?", "Nay, answer me: stand, and unfold yourself."),
            ("", "Long live the king!"),
        ],
    )


def _assert_same(a: PersonalState, b: PersonalState) -> None:
    assert set(a.tensors) == set(b.tensors)
    for name, arr in a.tensors.items():
        assert b.tensors[name].dtype == arr.dtype, name
        assert b.tensors[name].shape == arr.shape, name
        assert np.array_equal(b.tensors[name], arr), name
    assert b.history == a.history
    assert (b.rounds_trained, b.examples_seen) == (a.rounds_trained, a.examples_seen)
    assert b.run_plan == a.run_plan
    assert b.meta == a.meta
    assert b.examples == a.examples


# --- the store ---------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert not store.exists() and store.load() is None
    state = _state()
    store.save(state)
    assert store.exists()
    loaded = StateStore(tmp_path).load()  # a new store object: key read back from the key file
    assert loaded is not None
    _assert_same(state, loaded)
    assert all(isinstance(e, tuple) for e in loaded.history)


def test_empty_state_round_trip(tmp_path: Path) -> None:
    StateStore(tmp_path).save(PersonalState())
    loaded = StateStore(tmp_path).load()
    assert loaded is not None
    _assert_same(PersonalState(), loaded)


def test_file_is_encrypted_and_saves_use_fresh_nonces(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = _state()
    store.save(state)
    first = store.path.read_bytes()
    assert first.startswith(MAGIC)
    assert b"history" not in first and b"head.weight" not in first and b"abc123" not in first
    assert b"unfold yourself" not in first  # the user's own example turns are encrypted too
    assert state.tensors["head.weight"].tobytes()[:16] not in first
    store.save(state)
    second = store.path.read_bytes()
    assert first[len(MAGIC) : len(MAGIC) + 12] != second[len(MAGIC) : len(MAGIC) + 12], "nonce reused"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE, "state.key"], "temp files left behind"


def test_key_file_created_with_mode_0600(tmp_path: Path) -> None:
    StateStore(tmp_path)
    key = tmp_path / "state.key"
    assert key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    # Reused, not regenerated, by the next store.
    before = key.read_bytes()
    StateStore(tmp_path)
    assert key.read_bytes() == before


def test_custom_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "client.key"
    store = StateStore(tmp_path / "state", key_file=key_file)
    store.save(_state())
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (tmp_path / "state" / "state.key").exists()
    loaded = StateStore(tmp_path / "state", key_file=key_file).load()
    assert loaded is not None
    _assert_same(_state(), loaded)


@pytest.mark.parametrize("where", ["magic", "nonce", "body", "tag"])
def test_tampered_byte_raises(tmp_path: Path, where: str) -> None:
    store = StateStore(tmp_path)
    store.save(_state())
    blob = bytearray(store.path.read_bytes())
    pos = {
        "magic": 3,
        "nonce": len(MAGIC) + 5,
        "body": (len(MAGIC) + 12 + len(blob)) // 2,
        "tag": len(blob) - 1,
    }
    blob[pos[where]] ^= 0x01
    store.path.write_bytes(bytes(blob))
    with pytest.raises(StateError):
        StateStore(tmp_path).load()


@pytest.mark.parametrize("cut", ["empty", "magic-only", "header", "half", "last-byte"])
def test_truncated_file_raises(tmp_path: Path, cut: str) -> None:
    store = StateStore(tmp_path)
    store.save(_state())
    blob = store.path.read_bytes()
    length = {
        "empty": 0,
        "magic-only": len(MAGIC),
        "header": len(MAGIC) + 12 + 10,
        "half": len(blob) // 2,
        "last-byte": len(blob) - 1,
    }[cut]
    store.path.write_bytes(blob[:length])
    with pytest.raises(StateError):
        StateStore(tmp_path).load()


def test_appended_bytes_raise(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(_state())
    store.path.write_bytes(store.path.read_bytes() + b"\x00")
    with pytest.raises(StateError):
        store.load()


def test_wrong_env_key_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    StateStore(tmp_path).save(_state())  # key from the key file
    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))
    with pytest.raises(StateError, match="authentication"):
        StateStore(tmp_path).load()


def test_env_key_round_trip_and_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_hex(32)
    monkeypatch.setenv(KEY_ENV, key)
    StateStore(tmp_path).save(_state())
    assert not (tmp_path / "state.key").exists(), "an env key must not create a key file"
    loaded = StateStore(tmp_path).load()
    assert loaded is not None
    _assert_same(_state(), loaded)
    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))
    with pytest.raises(StateError):
        StateStore(tmp_path).load()
    monkeypatch.setenv(KEY_ENV, key.upper())  # hex is case-insensitive
    assert StateStore(tmp_path).load() is not None


@pytest.mark.parametrize("value", ["zz" * 32, "ab" * 16, "ab" * 33])
def test_malformed_env_key_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(StateError, match=KEY_ENV):
        StateStore(tmp_path)


def test_missing_key_file_with_existing_state_raises(tmp_path: Path) -> None:
    StateStore(tmp_path).save(_state())
    blob = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / "state.key").unlink()
    with pytest.raises(StateError, match="missing"):
        StateStore(tmp_path)
    # Never a silent reset: no new key was made, the state file is untouched.
    assert not (tmp_path / "state.key").exists()
    assert (tmp_path / STATE_FILE).read_bytes() == blob


def test_key_file_of_wrong_size_raises(tmp_path: Path) -> None:
    StateStore(tmp_path).save(_state())
    (tmp_path / "state.key").write_bytes(os.urandom(16))
    with pytest.raises(StateError, match="16 bytes"):
        StateStore(tmp_path)


def test_replaced_key_file_raises(tmp_path: Path) -> None:
    StateStore(tmp_path).save(_state())
    (tmp_path / "state.key").write_bytes(os.urandom(32))
    with pytest.raises(StateError):
        StateStore(tmp_path).load()


def test_run_train_refuses_damaged_state(tmp_path: Path) -> None:
    cfg = _cfg()
    node = NodeInfo(0, 4, tmp_path, run_id=1)
    shared = _initial_shared(cfg)
    run_train(cfg, node, shared, 1)
    path = tmp_path / STATE_FILE
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(StateError):
        run_train(cfg, node, shared, 2)
    assert path.read_bytes() == bytes(blob), "a damaged state is never overwritten"


# --- a client restart, every mode --------------------------------------------------------------------

BASE = {
    **TINY_TRAIN,
    "dp.noise-multiplier": 1.0,  # fixed σ: no calibration, DP training still on
    "dp.accountant": "rdp",
}


def _cfg(**over: object) -> Config:
    return Config.from_run_config({**BASE, **over})


def _roles(cfg: Config) -> dict[str, list[str]]:
    template = get_backbone(cfg).template
    return split_names([n for n, _ in template.named_parameters()], cfg.personalization.mode)


def _initial_shared(cfg: Config) -> dict[str, np.ndarray]:
    template = get_backbone(cfg).template
    return get_arrays(template, _roles(cfg)["shared"])


@pytest.mark.parametrize("mode", MODES)
def test_client_restart_resumes_personal_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    cfg = _cfg(**{"personalization.mode": mode})
    roles = _roles(cfg)
    template = dict(get_backbone(cfg).template.named_parameters())
    shared0 = _initial_shared(cfg)
    node = NodeInfo(1, 4, tmp_path, run_id=1, device="cpu")  # compared with a CPU recomputation below

    out1, m1 = run_train(cfg, node, shared0, 1)
    # Only the shared tensors leave the client; the personal ones never do.
    assert sorted(out1) == roles["shared"]
    assert not set(out1) & set(roles["personal"])
    assert not set(out1) & set(roles["frozen"])
    assert m1[P.BYTES_UP] == sum(a.nbytes for a in out1.values())
    if mode != "local":
        assert any(not np.array_equal(out1[k], shared0[k]) for k in out1), "shared tensors were not trained"
    state1 = StateStore(tmp_path).load()
    assert state1 is not None
    assert sorted(state1.tensors) == roles["personal"]
    assert state1.rounds_trained == 1 and state1.examples_seen == 60
    assert state1.history == [(1.0, 1 / 3, 3)]
    if "head.weight" in roles["personal"]:
        assert not np.array_equal(state1.tensors["head.weight"], template["head.weight"].detach().numpy())

    # Restart: a new process would rebuild the backbone and re-encode the data.
    monkeypatch.setattr(common.backbone, "_CACHE", {})
    monkeypatch.setattr(common.features, "_CACHE", OrderedDict())
    ev = run_evaluate(cfg, node, out1, final_round=False)
    backbone = get_backbone(cfg)
    assert all(torch.equal(p, template[n]) for n, p in backbone.template.named_parameters()), (
        "the rebuilt model differs from the first build"
    )
    data = load_client_data(cfg.task, 1, 4)
    test = encode(backbone, data.test_texts, data.test_labels, cfg.task.max_length)
    model = backbone.new_model()
    set_arrays(model, out1, roles["shared"])
    set_arrays(model, state1.tensors, roles["personal"])
    own = get_task(cfg).evaluate(model, test)
    acc, loss = own.accuracy, own.loss
    assert ev[P.EVAL_ACC] == acc
    assert ev[P.EVAL_LOSS] == pytest.approx(loss, rel=1e-6)
    assert ev[P.EVAL_ACC] == m1[P.ACC_AFTER]
    if roles["personal"]:  # the saved personal part matters: without it the loss is different
        without = backbone.new_model()
        set_arrays(without, out1, roles["shared"])
        assert get_task(cfg).evaluate(without, test).loss != pytest.approx(ev[P.EVAL_LOSS], rel=1e-6)

    # Round 2 starts from the saved personal part and the shared tensors the server sent back.
    out2, m2 = run_train(cfg, node, out1, 2)
    assert m2[P.ACC_BEFORE] == ev[P.EVAL_ACC]
    assert sorted(out2) == roles["shared"]
    state2 = StateStore(tmp_path).load()
    assert state2 is not None
    assert state2.rounds_trained == 2 and state2.examples_seen == 120
    assert state2.history == [(1.0, 1 / 3, 6)]
    assert sorted(state2.tensors) == roles["personal"]
    if "head.weight" in roles["personal"]:
        assert not np.array_equal(state2.tensors["head.weight"], state1.tensors["head.weight"])


def test_state_of_another_model_is_refused(tmp_path: Path) -> None:
    cfg = _cfg()
    StateStore(tmp_path).save(PersonalState(meta={"mode": "fedper", "model": "0123456789abcdef"}))
    blob = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(StateError, match="another model"):
        run_train(cfg, NodeInfo(0, 4, tmp_path, run_id=1), _initial_shared(cfg), 1)
    assert (tmp_path / STATE_FILE).read_bytes() == blob
