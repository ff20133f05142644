"""The device, not the server, has the last word on what it spends: its ε cap, its δ, DP or not.

Also: δ conventions an auditor accepts (min(1e-5, 0.1/n) by default, δ ≥ 1/n refused), and refusal
reasons that carry no path of the device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import TINY_TRAIN

from client.app import public_reason
from client.node import NodeInfo, check_device_limits, run_evaluate, run_train
from client.state import StateStore
from common import protocol as P
from common.config import Config
from common.errors import DeviceRefusal, StateError
from common.params import get_arrays
from common.privacy import check_delta, default_delta
from common.split import split_names
from common.tasks import get_backbone


def _shared(cfg: Config) -> dict:
    template = get_backbone(cfg).template
    return get_arrays(template, split_names([n for n, _ in template.named_parameters()], "fedper")["shared"])


def _node(tmp_path: Path, **limits: object) -> NodeInfo:
    return dataclasses.replace(NodeInfo(0, 4, tmp_path / "device", run_id=1), **limits)  # type: ignore[arg-type]


def test_a_run_asking_more_than_the_device_cap_is_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    capped = _node(tmp_path, max_epsilon=8.0, allow_no_dp=False)
    for over, match in (
        ({"dp.epsilon": 16.0}, r"asks for a budget of ε = 16; this device caps .* at ε = 8"),
        ({"dp.enabled": False}, r"without sample-level DP .* --allow-no-dp"),
    ):
        cfg = Config.from_run_config({**TINY_TRAIN, **over})
        with pytest.raises(DeviceRefusal, match=match):
            run_train(cfg, capped, {}, 1)  # empty shared tensors: refused before they are even read
        with pytest.raises(DeviceRefusal, match=match):
            run_evaluate(cfg, capped, {}, final_round=True)
    assert not (tmp_path / "device").exists()  # nothing loaded, nothing written
    check_device_limits(Config.from_run_config({**TINY_TRAIN, "dp.epsilon": 8.0}), capped)  # at the cap: ok
    opted_in = _node(tmp_path, max_epsilon=8.0, allow_no_dp=True)
    check_device_limits(Config.from_run_config({**TINY_TRAIN, "dp.enabled": False}), opted_in)


def test_the_device_cap_holds_across_runs_whatever_each_run_asks(tmp_path: Path) -> None:
    """Run 1 spends up to the cap; run 2 asks for more than the cap and is refused; ε never passes it."""
    cfg = Config.from_run_config({**TINY_TRAIN, "dp.epsilon": 2.0, "fed.num-rounds": 2})
    node = _node(tmp_path, max_epsilon=2.0)
    shared = _shared(cfg)
    for rnd in (1, 2):
        _, metrics = run_train(cfg, node, shared, rnd)
    assert metrics[P.EPSILON] <= 2.0 + 1e-9
    louder = Config.from_run_config({**TINY_TRAIN, "dp.epsilon": 24.0})
    with pytest.raises(DeviceRefusal, match="caps its privacy loss"):
        run_train(louder, dataclasses.replace(node, run_id=2), shared, 1)
    state = StateStore(tmp_path / "device").load()
    assert state is not None and state.rounds_trained == 2  # the refused run trained nothing


def test_default_delta_is_an_auditors_delta_and_a_weak_one_is_refused(tmp_path: Path) -> None:
    assert default_delta(250, 1e-5) == 1e-5 and default_delta(50_000, 1e-5) == pytest.approx(2e-6)
    with pytest.raises(ValueError, match=r"not below 1/13"):
        check_delta(1 / 13, 13, "dp.delta")
    cfg = Config.from_run_config(TINY_TRAIN)
    _, metrics = run_train(cfg, _node(tmp_path / "a"), _shared(cfg), 1)
    n = int(metrics[P.NUM_EXAMPLES])
    assert metrics[P.DELTA] == pytest.approx(min(1e-5, 0.1 / n))
    weak = Config.from_run_config({**TINY_TRAIN, "dp.delta": 0.05})  # ≥ 1/n for this client's n = 60
    assert n >= 20
    with pytest.raises(DeviceRefusal, match="publishing one random record"):
        run_train(weak, _node(tmp_path / "b"), _shared(cfg), 1)
    strict = _node(tmp_path / "c", delta=1e-6)  # the device's own δ is used when the run sets none
    _, metrics = run_train(cfg, strict, _shared(cfg), 1)
    assert metrics[P.DELTA] == 1e-6
    with pytest.raises(DeviceRefusal, match=r"asks for δ = 1e-05; this device accounts at δ ≤ 1e-06"):
        check_device_limits(Config.from_run_config({**TINY_TRAIN, "dp.delta": 1e-5}), strict)


def test_a_refusal_sent_to_the_server_names_no_path_of_the_device() -> None:
    exc = StateError("personal state in /home/ann/my data/.fedpers was made for another model; use a new one")
    reason = public_reason(exc, ("/home/ann/my data/.fedpers",))
    assert (
        "/home" not in reason and "ann" not in reason and reason.startswith("StateError: personal state in")
    )
    assert "/srv" not in public_reason(ValueError("data file /srv/x/y.csv is not UTF-8 text (line 3)"))


def test_bad_device_limits_are_named_as_the_user_wrote_them(tmp_path: Path) -> None:
    from common.config import validate_device_limits
    from common.errors import ConfigError
    from simulations.run import load_settings

    with pytest.raises(ConfigError, match=r"^--max-epsilon must be a number > 0, got 0$"):
        validate_device_limits({"max-epsilon": 0}, lambda key: f"--{key}")
    config = tmp_path / "sim.toml"
    config.write_text("[simulation]\nnum-clients = 2\ndelta = 0.5\n\n[run-config]\n")
    with pytest.raises(ConfigError, match=r"\[simulation\] delta must be in \[0, 0.1\)"):
        load_settings(config)
    config.write_text('[simulation]\nnum-clients = 2\nallow-no-dp = "yes"\n\n[run-config]\n')
    with pytest.raises(ConfigError, match=r"\[simulation\] allow-no-dp must be true or false"):
        load_settings(config)
