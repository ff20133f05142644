"""Tests of common.config: defaults, validation errors, round trips, CLI and TOML overrides."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from common.config import (
    DEFAULTS,
    MODES,
    Config,
    allowed_keys,
    default_run_config,
    load_overrides_toml,
    parse_set_options,
)
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_defaults() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def test_the_shipped_defaults_equal_pyprojects_table() -> None:
    """common/defaults.toml (read by fedpers, in the wheel) = [tool.flwr.app.config] (read by flwr run)."""
    with DEFAULTS.open("rb") as fh:
        shipped = tomllib.load(fh)
    assert DEFAULTS.parent == ROOT / "common"
    raw = _pyproject_defaults()
    assert list(shipped) == list(raw), "same keys in the same order"
    for key, value in raw.items():
        assert shipped[key] == value and type(shipped[key]) is type(value), key
    assert default_run_config() == raw


def test_defaults_parse_and_match_pyproject() -> None:
    cfg = Config.from_run_config({})
    raw = _pyproject_defaults()
    # Spot-check typed values against the file (not against the parser's own output).
    assert cfg.model.name == raw["model.name"]
    assert cfg.lora.r == raw["lora.r"] and isinstance(cfg.lora.r, int)
    assert cfg.lora.alpha == raw["lora.alpha"] and isinstance(cfg.lora.alpha, float)
    assert cfg.dp.enabled is raw["dp.enabled"]
    assert cfg.dp.epsilon == raw["dp.epsilon"]
    assert cfg.personalization.mode == raw["personalization.mode"]
    assert cfg.personalization.mode in MODES
    assert cfg.lora.targets == tuple(t.strip() for t in str(raw["lora.target-modules"]).split(","))
    # Every field equals its pyproject value.
    flat = cfg.to_run_config()
    for key, value in raw.items():
        assert flat[key] == value, key
        int_for_float = isinstance(value, int) and isinstance(flat[key], float)
        assert type(flat[key]) is type(value) or int_for_float, key


def test_pyproject_keys_equal_allowed_keys() -> None:
    raw = set(_pyproject_defaults())
    allowed = allowed_keys()
    assert len(allowed) == len(set(allowed)), "duplicate keys"
    assert raw - set(allowed) == set(), "keys in pyproject that the parser does not know"
    assert set(allowed) - raw == set(), "keys the parser knows without a default in pyproject"
    assert set(default_run_config()) == raw


@pytest.mark.parametrize(
    ("bad", "good"),
    [
        ("dp.epsillon", "dp.epsilon"),
        ("train.batchsize", "train.batch-size"),
        ("lora.targets", "lora.target-modules"),
    ],
)
def test_unknown_key_names_key_and_suggests(bad: str, good: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Config.from_run_config({bad: 1})
    msg = str(exc.value)
    assert repr(bad) in msg
    assert f"Did you mean {good}" in msg


def test_unknown_key_without_close_match_still_lists_allowed() -> None:
    with pytest.raises(ConfigError) as exc:
        Config.from_run_config({"zzzzzz": 1})
    assert "'zzzzzz'" in str(exc.value)
    assert "Did you mean" not in str(exc.value)
    assert "dp.epsilon" in str(exc.value)


def test_non_strict_ignores_unknown_keys_but_validates_known() -> None:
    cfg = Config.from_run_config({"something.else": 3, "lora.r": 4}, strict=False)
    assert cfg.lora.r == 4
    with pytest.raises(ConfigError, match="lora.r"):
        Config.from_run_config({"something.else": 3, "lora.r": "four"}, strict=False)


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("lora.r", "eight", "integer"),
        ("lora.r", True, "integer"),
        ("lora.r", 8.5, "integer"),
        ("task.train-size", False, "integer"),
        ("lora.alpha", "sixteen", "number"),
        ("lora.alpha", True, "number"),
        ("dp.enabled", 1, "boolean"),
        ("dp.enabled", "yes", "boolean"),
        ("model.name", 3, "string"),
        ("task.labels", ["a", "b"], "string"),
    ],
)
def test_wrong_type_names_key(key: str, value: object, what: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Config.from_run_config({key: value})
    assert repr(key) in str(exc.value)
    assert what in str(exc.value)


def test_string_forms_are_coerced() -> None:
    cfg = Config.from_run_config(
        {"lora.r": "4", "lora.alpha": "2.5", "dp.enabled": "FALSE", "lora.dropout": 0}
    )
    assert cfg.lora.r == 4 and isinstance(cfg.lora.r, int)
    assert cfg.lora.alpha == 2.5
    assert cfg.dp.enabled is False
    assert cfg.lora.dropout == 0.0 and isinstance(cfg.lora.dropout, float)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("model.name", "bert-large", ["minilm", "tiny"]),
        ("personalization.mode", "fedprox", list(MODES)),
        ("dp.accountant", "gdp", ["prv", "rdp"]),
        ("dp.grad-sample-mode", "ew", ["hooks", "functorch", "ghost"]),
    ],
)
def test_value_outside_choices_names_allowed(key: str, value: str, allowed: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        Config.from_run_config({key: value})
    msg = str(exc.value)
    assert repr(key) in msg and repr(value) in msg
    for a in allowed:
        assert a in msg


@pytest.mark.parametrize(
    ("key", "value", "bounds"),
    [
        ("lora.r", -1, "[0, 256]"),
        ("lora.r", 257, "[0, 256]"),
        ("lora.dropout", 0.95, "[0.0, 0.9]"),
        ("dp.delta", 0.5, "[0.0, 0.1]"),
        ("dp.epsilon", 0.0, "[0.001, inf]"),
        ("fed.fraction-train", 1.5, "[0.0, 1.0]"),
        ("task.max-length", 4, "[8, 512]"),
        ("model.frozen-layers", -1, "[0, inf]"),
    ],
)
def test_value_outside_range_names_bounds(key: str, value: float, bounds: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Config.from_run_config({key: value})
    assert repr(key) in str(exc.value)
    assert bounds in str(exc.value)


def test_range_bounds_are_inclusive() -> None:
    cfg = Config.from_run_config({"lora.r": 256, "lora.dropout": 0.9, "fed.fraction-train": 0.0})
    assert (cfg.lora.r, cfg.lora.dropout, cfg.fed.fraction_train) == (256, 0.9, 0.0)


@pytest.mark.parametrize("key", ["dp.epsilon", "dp.max-grad-norm", "fed.max-update-norm", "lora.alpha"])
def test_nan_is_rejected(key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.from_run_config({key: math.nan})


def test_to_run_config_round_trips() -> None:
    cfg = Config.from_run_config(
        {
            "model.name": "tiny",
            "lora.r": 4,
            "dp.enabled": False,
            "personalization.mode": "ffa",
            "dp.epsilon": 3,
        }
    )
    flat = cfg.to_run_config()
    assert set(flat) == set(allowed_keys())
    assert flat["lora.r"] == 4 and flat["dp.enabled"] is False and flat["personalization.mode"] == "ffa"
    assert flat["dp.epsilon"] == 3.0 and isinstance(flat["dp.epsilon"], float)
    assert Config.from_run_config(flat) == cfg
    assert Config.from_run_config(flat).to_run_config() == flat


def test_replace_validates_and_changes_only_given_keys() -> None:
    cfg = Config.from_run_config({"model.name": "tiny"})
    new = cfg.replace(**{"lora.r": 2})
    assert new.lora.r == 2 and new.model.name == "tiny"
    assert cfg.lora.r != 2  # frozen original untouched
    with pytest.raises(ConfigError, match="lora.rr"):
        cfg.replace(**{"lora.rr": 2})
    with pytest.raises(ConfigError, match="lora.r"):
        cfg.replace(**{"lora.r": "x"})


def test_parse_set_options_types_values() -> None:
    out = parse_set_options(
        [
            "dp.epsilon=3",
            "personalization.mode=local",
            "dp.enabled=false",
            "lora.alpha=2.5",
            " task.labels =neg,pos",
            "task.dataset=file",
            'output.run-dir="runs/x=1"',
        ]
    )
    assert out["dp.epsilon"] == 3 and isinstance(out["dp.epsilon"], int)
    assert out["personalization.mode"] == "local"
    assert out["dp.enabled"] is False
    assert out["lora.alpha"] == 2.5
    assert out["task.labels"] == "neg,pos"
    assert out["output.run-dir"] == "runs/x=1"
    cfg = Config.from_run_config(out)
    assert cfg.dp.epsilon == 3.0 and isinstance(cfg.dp.epsilon, float)
    assert cfg.personalization.mode == "local"


def test_parse_set_options_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_options(["dp.epsilon"])
    with pytest.raises(ConfigError, match="dp.epsillon"):
        parse_set_options(["dp.epsillon=3"])


def test_load_overrides_toml(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        "[simulation]\nnum-clients = 3\n\n"
        '[run-config]\n"dp.epsilon" = 3.0\n"personalization.mode" = "fedsa"\n\n'
        "[run-config.lora]\nr = 4\n"
    )
    out = load_overrides_toml(path)
    assert out == {"dp.epsilon": 3.0, "personalization.mode": "fedsa", "lora.r": 4}
    cfg = Config.from_run_config(out)
    assert (cfg.dp.epsilon, cfg.personalization.mode, cfg.lora.r) == (3.0, "fedsa", 4)


def test_load_overrides_toml_without_run_config_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("[simulation]\nnum-clients = 3\n")
    assert load_overrides_toml(path) == {}


def test_load_overrides_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_overrides_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run-config\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_overrides_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[run-config]\n"lora.rank" = 4\n')
    with pytest.raises(ConfigError, match="lora.rank"):
        load_overrides_toml(unknown)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "simulations" / "configs").glob("*.toml")), ids=lambda p: p.name
)
def test_shipped_simulation_configs_are_valid(path: Path) -> None:
    Config.from_run_config(load_overrides_toml(path))
