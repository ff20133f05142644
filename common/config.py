"""Typed, validated run configuration.

The defaults are ``common/defaults.toml``, shipped inside the package (an installed wheel has no
pyproject.toml), and equal to ``[tool.flwr.app.config]`` of ``pyproject.toml`` (dotted keys, what Flower
reads for ``flwr run .``; tests/test_config.py keeps the two identical). This module turns such a flat
mapping into frozen nested dataclasses, rejecting unknown keys, wrong types and values outside the allowed
set with a :class:`ConfigError` that names the key. Server and client use the same parser.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, get_type_hints

from common.chat_format import PICKS
from common.errors import ConfigError

DEFAULTS = Path(__file__).resolve().with_name("defaults.toml")  # the defaults fedpers reads (in the wheel)

TEXT_DATASETS = ("shakespeare", "text-file")  # free text for the causal LMs (no labels)
USER_FILE_DATASETS = ("file", "text-file")  # bring-your-own files: one client per user
MODES = ("fedper", "local", "fedavg", "fedavg-ft", "fedsa", "ffa", "fedbias")
CAUSAL_MODELS = ("smollm2", "tiny-lm")  # model.name values that build the generative model


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What data each client learns from."""

    dataset: str = dataclasses.field(metadata=_choices("tweets", "news", "file", "shakespeare", "text-file"))
    data_path: str
    labels: str
    dirichlet_alpha: float = dataclasses.field(metadata=_range(1e-6, None))
    train_size: int = dataclasses.field(metadata=_range(1, None))
    test_size: int = dataclasses.field(metadata=_range(1, None))
    max_length: int = dataclasses.field(metadata=_range(8, 512))
    topics_liked: int = dataclasses.field(metadata=_range(1, 4))
    seed: int
    evaluate_on: str = dataclasses.field(metadata=_choices("test", "validation"))
    validation_fraction: float = dataclasses.field(metadata=_range(0.05, 0.5))
    pii_scrub: bool
    pii_patterns: str
    min_speeches: int = dataclasses.field(metadata=_range(2, None))
    lm_format: str = dataclasses.field(metadata=_choices("text", "chat"))
    min_examples: int = dataclasses.field(metadata=_range(0, None))
    max_users: int = dataclasses.field(metadata=_range(0, None))

    def __post_init__(self) -> None:
        if self.dataset not in USER_FILE_DATASETS:
            for key, value in (("task.min-examples", self.min_examples), ("task.max-users", self.max_users)):
                if value:
                    raise ConfigError(
                        f"{key} = {value} selects users of a data file with a user column: it applies to "
                        f"task.dataset = 'file' or 'text-file', not {self.dataset!r} (set it to 0)"
                    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone and the frozen/trainable boundary."""

    name: str = dataclasses.field(metadata=_choices("minilm", "tiny", *CAUSAL_MODELS))
    frozen_layers: int = dataclasses.field(metadata=_range(0, None))
    seed: int
    personal_part: str = dataclasses.field(metadata=_choices("adapter", "bias", "last-block"))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA adapter settings."""

    r: int = dataclasses.field(metadata=_range(1, 256))
    alpha: float = dataclasses.field(metadata=_range(1e-6, None))
    dropout: float = dataclasses.field(metadata=_range(0.0, 0.9))
    target_modules: str

    @property
    def targets(self) -> tuple[str, ...]:
        """The target module names as a tuple."""
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class PersonalizationConfig:
    """Which parameters are shared, personal or frozen (see common.split)."""

    mode: str = dataclasses.field(metadata=_choices(*MODES))
    finetune_epochs: int = dataclasses.field(metadata=_range(0, None))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Local optimisation on each client."""

    local_epochs: int = dataclasses.field(metadata=_range(1, None))
    batch_size: int = dataclasses.field(metadata=_range(1, None))
    optimizer: str = dataclasses.field(metadata=_choices("sgd", "adam"))
    lr_lora: float = dataclasses.field(metadata=_range(0.0, None))
    lr_head: float = dataclasses.field(metadata=_range(0.0, None))
    momentum: float = dataclasses.field(metadata=_range(0.0, 0.999))
    threads: int = dataclasses.field(metadata=_range(0, None))


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD on each client (Opacus)."""

    enabled: bool
    epsilon: float = dataclasses.field(metadata=_range(1e-3, None))
    delta: float = dataclasses.field(metadata=_range(0.0, 0.1))
    max_grad_norm: float = dataclasses.field(metadata=_range(1e-6, None))
    clipping: str = dataclasses.field(metadata=_choices("flat", "per-tensor"))
    noise_multiplier: float = dataclasses.field(metadata=_range(0.0, None))
    accountant: str = dataclasses.field(metadata=_choices("prv", "rdp"))
    grad_sample_mode: str = dataclasses.field(metadata=_choices("hooks", "functorch", "ghost"))
    user_level: bool
    user_noise_multiplier: float = dataclasses.field(metadata=_range(0.0, None))
    user_clipping_norm: float = dataclasses.field(metadata=_range(1e-9, None))
    user_clipping: str = dataclasses.field(metadata=_choices("fixed", "adaptive"))
    user_target_quantile: float = dataclasses.field(metadata=_range(0.0, 1.0))
    user_clip_lr: float = dataclasses.field(metadata=_range(0.0, None))
    user_count_stddev: float = dataclasses.field(metadata=_range(0.0, None))
    user_sampling: str = dataclasses.field(metadata=_choices("poisson", "none"))
    user_delta: float = dataclasses.field(metadata=_range(0.0, 0.1))
    user_epsilon: float = dataclasses.field(metadata=_range(0.0, None))


@dataclasses.dataclass(frozen=True)
class FedConfig:
    """Server-side federation settings."""

    num_rounds: int = dataclasses.field(metadata=_range(1, None))
    fraction_train: float = dataclasses.field(metadata=_range(0.0, 1.0))
    fraction_evaluate: float = dataclasses.field(metadata=_range(0.0, 1.0))
    min_clients: int = dataclasses.field(metadata=_range(1, None))
    max_update_norm: float = dataclasses.field(metadata=_range(0.0, None))
    server_lr: float = dataclasses.field(metadata=_range(1e-6, None))
    server_momentum: float = dataclasses.field(metadata=_range(0.0, 0.999))
    round_timeout: float = dataclasses.field(metadata=_range(1.0, None))


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
    """Flower's SecAgg+ (the server sees only the sum of the shared updates); see server.secagg."""

    enabled: bool
    num_shares: int = dataclasses.field(metadata=_range(3, None))
    threshold: int = dataclasses.field(metadata=_range(2, None))
    clipping_range: float = dataclasses.field(metadata=_range(1e-6, None))
    max_weight: int = dataclasses.field(metadata=_range(0, None))


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Where the client keeps its encrypted personal state, and what it reports."""

    state_root: str
    report_before_after: bool
    feature_cache: str
    chat_examples: int = dataclasses.field(metadata=_range(0, 64))
    chat_pick: str = dataclasses.field(metadata=_choices(*PICKS))
    chat_pool: int = dataclasses.field(metadata=_range(1, 4096))


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the server writes the run's outputs."""

    run_dir: str
    resume: bool
    ledger: str


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run configuration (frozen)."""

    task: TaskConfig
    model: ModelConfig
    lora: LoraConfig
    personalization: PersonalizationConfig
    train: TrainConfig
    dp: DPConfig
    fed: FedConfig
    secagg: SecAggConfig
    client: ClientConfig
    output: OutputConfig

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, strict: bool = True) -> Config:
        """Build a Config from Flower's flat ``run_config`` on top of the defaults.

        Keys missing from ``run_config`` take their default. With ``strict`` an unknown key raises.
        """
        merged = dict(default_run_config())
        merged.update(validate_keys(run_config) if strict else _known(run_config))
        sections = {}
        hints = get_type_hints(cls)
        for section in dataclasses.fields(cls):
            section_cls = hints[section.name]
            values = {}
            for field, ftype in get_type_hints(section_cls).items():
                key = _key(section.name, field)
                values[field] = _coerce(key, merged[key], ftype, _metadata(section_cls, field))
            sections[section.name] = section_cls(**values)
        return cls(**sections)

    def __post_init__(self) -> None:
        causal, text = self.model.name in CAUSAL_MODELS, self.task.dataset in TEXT_DATASETS
        if causal != text:
            raise ConfigError(
                f"model.name = {self.model.name!r} does not fit task.dataset = {self.task.dataset!r}: "
                f"the causal LMs ({', '.join(CAUSAL_MODELS)}) learn from text (task.dataset = "
                "'shakespeare' or 'text-file'), the classifiers (minilm, tiny) from labelled examples "
                "(tweets, news, file)"
            )
        if self.task.lm_format == "chat" and not causal:
            raise ConfigError(
                "task.lm-format = 'chat' trains a causal LM on chat turns: choose one in model.name"
            )

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten back to dotted keys (the inverse of :meth:`from_run_config`)."""
        flat: dict[str, bool | int | float | str] = {}
        for section in dataclasses.fields(self):
            for field in dataclasses.fields(getattr(self, section.name)):
                flat[_key(section.name, field.name)] = getattr(getattr(self, section.name), field.name)
        return flat

    def secagg_max_weight(self) -> int:
        """The largest ``num-examples`` one client may report under SecAgg+ (0 means task.train-size)."""
        return self.secagg.max_weight or self.task.train_size

    def replace(self, **dotted: Any) -> Config:
        """A copy with some dotted keys changed (validated like any other input)."""
        flat = self.to_run_config()
        flat.update(validate_keys(dotted))
        return Config.from_run_config(flat)


def is_causal(cfg: Config) -> bool:
    """Whether ``cfg`` builds the generative model (common.causal_model) rather than the classifier."""
    return cfg.model.name in CAUSAL_MODELS


def _key(section: str, field: str) -> str:
    return f"{section}.{field.replace('_', '-')}"


def _metadata(section_cls: type, field: str) -> Mapping[str, Any]:
    for f in dataclasses.fields(section_cls):
        if f.name == field:
            return f.metadata
    return {}


def allowed_keys() -> tuple[str, ...]:
    """Every dotted key the configuration accepts."""
    keys = []
    hints = get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for field in get_type_hints(hints[section.name]):
            keys.append(_key(section.name, field))
    return tuple(keys)


def _known(run_config: Mapping[str, Any]) -> dict[str, Any]:
    allowed = set(allowed_keys())
    return {k: v for k, v in run_config.items() if k in allowed}


def validate_keys(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``run_config`` as a dict, raising ConfigError on any unknown key."""
    allowed = allowed_keys()
    for key in run_config:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint} Allowed keys: {', '.join(allowed)}")
    return dict(run_config)


def _coerce(key: str, value: Any, ftype: type, meta: Mapping[str, Any]) -> Any:
    if ftype is bool:
        if isinstance(value, bool):
            out: Any = value
        elif isinstance(value, str) and value.lower() in ("true", "false"):
            out = value.lower() == "true"
        else:
            raise ConfigError(f"config key {key!r} must be a boolean (true/false), got {value!r}")
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        try:
            out = int(value)
        except ValueError as exc:
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}") from exc
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        try:
            out = float(value)
        except ValueError as exc:
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}") from exc
    else:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        out = value
    if "choices" in meta and out not in meta["choices"]:
        raise ConfigError(
            f"config key {key!r} has value {out!r}; allowed values: {', '.join(meta['choices'])}"
        )
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"config key {key!r} must be a finite number, got {out!r}")
    if "range" in meta:
        lo, hi = meta["range"]
        if (lo is not None and out < lo) or (hi is not None and out > hi):
            raise ConfigError(
                f"config key {key!r} = {out!r} is out of range [{lo if lo is not None else '-inf'}, "
                f"{hi if hi is not None else 'inf'}]"
            )
    return out


@lru_cache(maxsize=1)
def default_run_config() -> dict[str, Any]:
    """The defaults from the package's ``defaults.toml`` (= pyproject's ``[tool.flwr.app.config]``)."""
    if not DEFAULTS.is_file():
        raise ConfigError(f"cannot find {DEFAULTS}: the fedpers installation is incomplete; reinstall it")
    with DEFAULTS.open("rb") as fh:
        flat = _flatten(tomllib.load(fh))
    missing = set(allowed_keys()) - set(flat)
    if missing:
        raise ConfigError(
            f"{DEFAULTS} lacks defaults for {sorted(missing)}: copy them from pyproject.toml "
            "[tool.flwr.app.config] (the two are kept identical)"
        )
    return validate_keys(flat)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_overrides_toml(path: str | Path) -> dict[str, Any]:
    """Read a simulation TOML's ``[run-config]`` table (dotted keys or nested tables)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    with p.open("rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    return validate_keys(_flatten(data.get("run-config", {})))


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings from the command line (values typed by TOML rules)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    return validate_keys(out)
