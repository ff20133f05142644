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
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, get_type_hints

from common.chat_format import PICKS
from common.errors import ConfigError
from common.pii import check_patterns

DEFAULTS = Path(__file__).resolve().with_name("defaults.toml")  # the defaults fedpers reads (in the wheel)

TEXT_DATASETS = ("shakespeare", "text-file")  # free text for the causal LMs (no labels)
TAGGED_DATASETS = ("wnut16",)  # a tag per word: named-entity recognition (common.tasks.tag)
USER_FILE_DATASETS = ("file", "text-file")  # bring-your-own files: one client per user
MODES = ("fedper", "local", "fedavg", "fedavg-ft", "fedsa", "ffa", "fedbias")
ALTERNATING_MODES = ("fedper", "fedsa", "ffa", "fedbias")  # a personal and a shared part (FedRep)
CAUSAL_MODELS = ("smollm2", "tiny-lm")  # model.name values that build the generative model
USER_KEYS = tuple(
    f"dp.user-{k}"
    for k in (
        "noise-multiplier", "clipping-norm", "clipping", "target-quantile", "clip-lr", "count-stddev",
        "sampling", "delta", "epsilon", "virtual-cohort", "virtual-population",
    )
)  # fmt: skip
ADAPTIVE_KEYS = ("dp.user-target-quantile", "dp.user-clip-lr", "dp.user-count-stddev")
CHAT_KEYS = ("client.chat-examples", "client.chat-pick", "client.chat-pool")

# The rules that join keys, one line each (docs/configuration.md lists them). Each is checked once, when
# the config is built: a section's own rules in its ``__post_init__``, the others in ``_check_across``.
# Rules that need facts only a run has (the population, a client's data, the model's tensor names, a
# device's physical batch) are checked where those facts are, and named there.
RULES = (
    "A key that does not apply to the chosen task or setting is refused unless it keeps its default.",
    "`model.name` and `task.dataset` go together: the causal LMs (smollm2, tiny-lm) learn from shakespeare "
    "or text-file, the encoders (minilm, tiny) from tweets, news, file (classify) or wnut16 (tag entities).",
    "`model.personal-part` applies to the causal LMs only.",
    "`dp.user-virtual-cohort` and `dp.user-virtual-population` go together (cohort < population), with "
    "fixed clipping and Poisson sampling.",
    "`personalization.final-fit` needs a mode with a personal part (not fedavg or fedavg-ft).",
    "`train.personal-epochs` needs a mode with a personal and a shared part (fedper, fedsa, ffa, fedbias).",
    "`lora.r = 0` (no LoRA, every encoder layer frozen) needs an encoder and a mode that shares the head or "
    "nothing (fedavg, fedavg-ft, fedbias, local), or fedper with `personalization.shared-projection`; "
    "`model.frozen-layers` and the other `lora.*` keys then keep their defaults.",
    "`personalization.shared-projection` needs `lora.r = 0` and a text classifier.",
    '`task.labels` applies to (and is needed by) `task.dataset = "file"`; `task.data-path`, '
    "`task.min-examples` and `task.max-users` to file and text-file; `task.dirichlet-alpha` and "
    "`task.partitioner` to tweets and file (`task.partitioner` to a file without a user column, checked "
    "when the file is read); `task.topics-liked` and `task.news-holdout` to news; `task.min-speeches` to "
    "shakespeare.",
    '`task.lm-format = "chat"` needs shakespeare or text-file; `client.chat-*` need '
    '`task.lm-format = "chat"`; `client.chat-pool` needs `client.chat-pick = "retrieve"`.',
    '`task.validation-fraction` needs `task.evaluate-on = "validation"`; `task.pii-patterns` needs '
    "`task.pii-scrub = true` and must be valid regular expressions.",
    "`dp.user-*` need `dp.user-level = true`; `dp.user-target-quantile`, `dp.user-clip-lr` and "
    '`dp.user-count-stddev` need `dp.user-clipping = "adaptive"`.',
    '`dp.grad-sample-mode = "ghost"` works with the text classifiers and `dp.clipping = "flat"` only '
    "(and no `fedpers agent --max-physical-batch` cap, checked on the device).",
    "With `secagg.enabled`: `secagg.num-shares` odd, `secagg.threshold` below it, `fed.min-clients` at "
    "least `secagg.num-shares`, `dp.user-level = false`, and a `personalization.mode` that shares tensors.",
)


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What data each client learns from."""

    dataset: str = dataclasses.field(
        metadata=_choices("tweets", "news", "file", "shakespeare", "text-file", "wnut16")
    )
    data_path: str
    labels: str
    dirichlet_alpha: float = dataclasses.field(metadata=_range(1e-6, None))
    partitioner: str = dataclasses.field(metadata=_choices("dirichlet", "fixed-size"))
    train_size: int = dataclasses.field(metadata=_range(1, None))
    test_size: int = dataclasses.field(metadata=_range(1, None))
    max_length: int = dataclasses.field(metadata=_range(8, 512))
    topics_liked: int = dataclasses.field(metadata=_range(1, 4))
    news_holdout: float = dataclasses.field(metadata=_range(0.0, 0.5))
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
        _only_for(self.dataset, USER_FILE_DATASETS, "task.min-examples", self.min_examples, 0)
        _only_for(self.dataset, USER_FILE_DATASETS, "task.max-users", self.max_users, 0)
        _only_for(self.dataset, USER_FILE_DATASETS, "task.data-path", self.data_path.strip(), "")
        _only_for(self.dataset, ("file",), "task.labels", self.labels.strip(), "")
        _only_for(self.dataset, ("tweets", "file"), "task.dirichlet-alpha", self.dirichlet_alpha)
        _only_for(self.dataset, ("tweets", "file"), "task.partitioner", self.partitioner)
        _only_for(self.dataset, ("news",), "task.topics-liked", self.topics_liked)
        _only_for(self.dataset, ("news",), "task.news-holdout", self.news_holdout)
        if self.news_holdout >= 0.5:  # half the articles or more held out leaves too few to train on
            raise ConfigError(f"task.news-holdout = {self.news_holdout!r} must be below 0.5")
        _only_for(self.dataset, ("shakespeare",), "task.min-speeches", self.min_speeches)
        if self.lm_format == "chat" and self.dataset not in TEXT_DATASETS:
            raise ConfigError(
                f"task.lm-format = 'chat' needs a text dataset (shakespeare, text-file), not "
                f"task.dataset = {self.dataset!r}: leave task.lm-format = 'text'"
            )
        if self.dataset == "file":
            _check_labels(self.labels)
        fraction, evaluate_on = self.validation_fraction, self.evaluate_on
        _unless("task.validation-fraction", fraction, "task.evaluate-on", evaluate_on, "validation")
        _unless("task.pii-patterns", self.pii_patterns.strip(), "task.pii-scrub", self.pii_scrub, True, "")
        check_patterns(self.pii_patterns)  # a bad regular expression fails here, not on a client


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

    r: int = dataclasses.field(metadata=_range(0, 256))  # 0: no LoRA, every encoder layer frozen
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
    final_fit: int = dataclasses.field(metadata=_range(0, None))
    shared_projection: int = dataclasses.field(metadata=_range(0, 4096))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Local optimisation on each client."""

    local_epochs: int = dataclasses.field(metadata=_range(1, None))
    personal_epochs: int = dataclasses.field(metadata=_range(0, None))
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
    user_virtual_cohort: int = dataclasses.field(metadata=_range(0, None))
    user_virtual_population: int = dataclasses.field(metadata=_range(0, None))

    def __post_init__(self) -> None:
        if self.grad_sample_mode == "ghost" and self.clipping == "per-tensor":
            raise ConfigError(
                "dp.clipping = 'per-tensor' needs dp.grad-sample-mode = 'hooks' or 'functorch' "
                "(ghost clipping clips one flat norm)"
            )
        for key in USER_KEYS:
            _unless(key, getattr(self, _field(key)), "dp.user-level", self.user_level, True)
        for key in ADAPTIVE_KEYS:
            _unless(key, getattr(self, _field(key)), "dp.user-clipping", self.user_clipping, "adaptive")
        cohort, population = self.user_virtual_cohort, self.user_virtual_population
        if (cohort > 0) != (population > 0) or (cohort > 0 and not cohort < population):
            raise ConfigError(
                f"dp.user-virtual-cohort = {cohort} and dp.user-virtual-population = {population}: set both "
                "(a cohort smaller than the population, e.g. 5000 and 1000000) or neither"
            )
        if cohort > 0 and (self.user_clipping == "adaptive" or self.user_sampling == "none"):
            raise ConfigError(
                "dp.user-virtual-cohort needs dp.user-clipping = 'fixed' and dp.user-sampling = 'poisson'"
            )


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
    evaluate_every: int = dataclasses.field(metadata=_range(1, None))


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
    """Flower's SecAgg+ (the server sees only the sum of the shared updates); see server.secagg."""

    enabled: bool
    num_shares: int = dataclasses.field(metadata=_range(3, None))
    threshold: int = dataclasses.field(metadata=_range(2, None))
    clipping_range: float = dataclasses.field(metadata=_range(1e-6, None))
    max_weight: int = dataclasses.field(metadata=_range(0, None))

    def __post_init__(self) -> None:
        if not self.enabled:  # the settings stay (a config may switch SecAgg+ on with --set)
            return
        if self.num_shares % 2 == 0:
            raise ConfigError(
                f"secagg.num-shares = {self.num_shares} must be odd (each client keeps one share and gives "
                "one to each of an even number of neighbours; Flower's SecAgg+ fails on even counts)"
            )
        if self.threshold >= self.num_shares:
            raise ConfigError(
                f"secagg.threshold = {self.threshold} must be below secagg.num-shares ({self.num_shares})"
            )


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Where the client keeps its encrypted personal state, and what it reports."""

    state_root: str
    report_before_after: bool
    feature_cache: str
    chat_examples: int = dataclasses.field(metadata=_range(0, 64))
    chat_pick: str = dataclasses.field(metadata=_choices(*PICKS))
    chat_pool: int = dataclasses.field(metadata=_range(1, 4096))

    def __post_init__(self) -> None:
        _unless("client.chat-pool", self.chat_pool, "client.chat-pick", self.chat_pick, "retrieve")


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
        _check_across(self)

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


def _check_across(cfg: Config) -> None:
    """Raise ConfigError for the first rule that joins keys of two sections (see :data:`RULES`)."""
    causal, text = cfg.model.name in CAUSAL_MODELS, cfg.task.dataset in TEXT_DATASETS
    if causal != text:
        raise ConfigError(
            f"model.name = {cfg.model.name!r} does not fit task.dataset = {cfg.task.dataset!r}: "
            f"the causal LMs ({', '.join(CAUSAL_MODELS)}) learn from text (task.dataset = "
            "'shakespeare' or 'text-file'), the encoders (minilm, tiny) from labelled examples "
            "(tweets, news, file, wnut16)"
        )
    if cfg.personalization.mode in ("fedavg", "fedavg-ft") and cfg.personalization.final_fit:
        raise ConfigError(
            f"personalization.final-fit = {cfg.personalization.final_fit} has no effect in mode "
            f"{cfg.personalization.mode!r}, which keeps no personal part: use a mode with one (fedper, "
            "fedsa, ffa, fedbias, local), or personalization.finetune-epochs with fedavg-ft"
        )
    if cfg.train.personal_epochs and cfg.personalization.mode not in ALTERNATING_MODES:
        raise ConfigError(
            f"train.personal-epochs = {cfg.train.personal_epochs} alternates a personal and a shared part, "
            f"and mode {cfg.personalization.mode!r} lacks one: use {', '.join(ALTERNATING_MODES)}, or "
            "train.personal-epochs = 0"
        )
    part = cfg.model.personal_part
    _only_for(cfg.model.name, CAUSAL_MODELS, "model.personal-part", part, key_of="model.name")
    for key in CHAT_KEYS:
        _unless(key, getattr(cfg.client, _field(key)), "task.lm-format", cfg.task.lm_format, "chat")
    if cfg.dp.grad_sample_mode == "ghost" and (causal or cfg.task.dataset in TAGGED_DATASETS):
        what = f"model.name = {cfg.model.name!r}" if causal else f"task.dataset = {cfg.task.dataset!r}"
        raise ConfigError(
            f"dp.grad-sample-mode = 'ghost' supports the text classifiers only, not {what}: "
            "use 'hooks' or 'functorch'"
        )
    if cfg.lora.r == 0:
        _check_no_lora(cfg)
    elif cfg.personalization.shared_projection:
        raise ConfigError(
            f"personalization.shared-projection = {cfg.personalization.shared_projection} needs lora.r = 0 "
            "(a head-only classifier; with LoRA the adapters are the shared part)"
        )
    if cfg.personalization.shared_projection and (causal or cfg.task.dataset in TAGGED_DATASETS):
        raise ConfigError("personalization.shared-projection is for the text classifiers (lora.r = 0)")
    if cfg.secagg.enabled:
        _check_secagg(cfg)


def _check_no_lora(cfg: Config) -> None:
    """``lora.r = 0``: the encoders only, every layer frozen, a mode that shares the head or nothing."""
    if cfg.model.name in CAUSAL_MODELS:
        raise ConfigError(
            f"lora.r = 0 (no LoRA) is for the encoders (minilm, tiny), not model.name = {cfg.model.name!r}: "
            "the causal LM's personal adapter takes its rank from lora.r"
        )
    projection = cfg.personalization.shared_projection > 0
    if cfg.personalization.mode in ("fedsa", "ffa") or (
        cfg.personalization.mode == "fedper" and not projection
    ):
        raise ConfigError(
            f"personalization.mode = {cfg.personalization.mode!r} shares LoRA tensors, and lora.r = 0 has "
            "none: use fedavg, fedavg-ft, fedbias or local (the head is then the whole trainable model), or "
            "fedper with personalization.shared-projection = k (a shared projection, a personal head)"
        )
    flat, defaults = cfg.to_run_config(), default_run_config()
    for key in ("model.frozen-layers", "lora.alpha", "lora.dropout", "lora.target-modules"):
        if flat[key] != defaults[key]:
            raise ConfigError(
                f"{key} = {_show(flat[key])} has no effect with lora.r = 0 (no LoRA: every encoder layer is "
                f"frozen): leave it at {_show(defaults[key])}"
            )


def _check_secagg(cfg: Config) -> None:
    """SecAgg+'s rules that join other sections (its own are in SecAggConfig)."""
    from common.split import shares_nothing  # common.split imports this module

    sa = cfg.secagg
    if cfg.fed.min_clients < sa.num_shares:
        raise ConfigError(
            f"fed.min-clients = {cfg.fed.min_clients} is below secagg.num-shares = {sa.num_shares}: "
            "every round must sample at least as many clients as each key is split into"
        )
    if cfg.dp.user_level:
        raise ConfigError(
            "dp.user-level = true needs each client's update on the server (to clip it), which SecAgg+ "
            "hides: use sample-level DP (dp.enabled) with secagg.enabled, or turn SecAgg+ off"
        )
    if shares_nothing(cfg.personalization.mode):
        raise ConfigError(
            f"personalization.mode = {cfg.personalization.mode!r} shares no tensors: nothing to aggregate "
            "securely (turn secagg.enabled off)"
        )


def _field(key: str) -> str:
    return key.split(".", 1)[1].replace("-", "_")


def _show(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def _only_for(
    choice: str,
    allowed: tuple[str, ...],
    key: str,
    value: Any,
    default: Any = None,
    key_of: str = "task.dataset",
) -> None:
    """Refuse ``key`` set away from its default while ``key_of`` = ``choice``, where it has no effect."""
    default = default_run_config()[key] if default is None else default
    if choice not in allowed and value != default:
        raise ConfigError(
            f"{key} = {_show(value)} applies only to {key_of} = {' or '.join(map(repr, allowed))}, not "
            f"{choice!r}: leave it at {_show(default)}"
        )


def _unless(key: str, value: Any, cond_key: str, cond: Any, needed: Any, default: Any = None) -> None:
    """Refuse ``key`` set away from its default unless ``cond_key`` = ``needed`` (else it has no effect)."""
    default = default_run_config()[key] if default is None else default
    if cond != needed and value != default:
        raise ConfigError(
            f"{key} = {_show(value)} has no effect unless {cond_key} = {_show(needed)} (it is "
            f"{_show(cond)}): set {cond_key}, or leave {key} at {_show(default)}"
        )


def _check_labels(labels: str) -> None:
    """Raise ConfigError unless ``task.labels`` lists distinct label names (task.dataset = "file")."""
    names = [n.strip() for n in labels.split(",") if n.strip()]
    if not names:
        raise ConfigError(
            "task.labels must list the label names for task.dataset = 'file', e.g. task.labels = \"neg,pos\""
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"task.labels lists a label twice: {labels!r}")


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


DEVICE_KEYS = ("max-epsilon", "delta", "allow-no-dp")  # a device's own privacy limits, not run config


def validate_device_limits(limits: Mapping[str, Any], name: Callable[[str], str]) -> dict[str, Any]:
    """A device's own privacy limits (``DEVICE_KEYS``) if valid, else ConfigError naming the key.

    ``name`` turns a key into what the user wrote: ``--max-epsilon`` (``fedpers agent``) or
    ``[simulation] max-epsilon`` (a simulation TOML).
    """
    unknown = sorted(set(limits) - set(DEVICE_KEYS))
    if unknown:
        raise ConfigError(f"unknown device limits {unknown}; allowed: {', '.join(DEVICE_KEYS)}")
    cap, delta, no_dp = (limits.get(k) for k in DEVICE_KEYS)
    number = (int, float)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, number) or not cap > 0):
        raise ConfigError(f"{name('max-epsilon')} must be a number > 0, got {cap!r}")
    if delta is not None and (
        isinstance(delta, bool) or not isinstance(delta, number) or not 0 <= delta < 0.1
    ):
        raise ConfigError(f"{name('delta')} must be in [0, 0.1) (0 = min(1e-5, 0.1/n)), got {delta!r}")
    if no_dp is not None and not isinstance(no_dp, bool):
        raise ConfigError(f"{name('allow-no-dp')} must be true or false, got {no_dp!r}")
    return dict(limits)


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
