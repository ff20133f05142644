"""Every rule that joins config keys fails when the config is built, naming the key (#32 item 5).

A key set for a task or setting where it has no effect is refused, not ignored; keys left at their
defaults never are. `fedpers simulate` stops on such a config with one `error:` line and no run folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common.config import RULES, Config
from common.errors import ConfigError

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}

LM = {"model.name": "tiny-lm", "task.dataset": "shakespeare"}
FILE = {"task.dataset": "file", "task.labels": "neg,pos"}
SECAGG = {"secagg.enabled": True, "fed.min-clients": 3}
USER = {"dp.user-level": True}

# case: (run config, a key the error names)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "causal model, labelled data": ({"model.name": "tiny-lm"}, "model.name"),
    "classifier, text data": ({"task.dataset": "shakespeare"}, "task.dataset"),
    "personal part of a classifier": ({"model.personal-part": "bias"}, "model.personal-part"),
    "labels without a file": ({"task.labels": "neg,pos"}, "task.labels"),
    "file without labels": ({"task.dataset": "file"}, "task.labels"),
    "a label twice": ({**FILE, "task.labels": "neg,pos,neg"}, "task.labels"),
    "data path for tweets": ({"task.data-path": "d.csv"}, "task.data-path"),
    "min-examples for tweets": ({"task.min-examples": 3}, "task.min-examples"),
    "max-users for news": ({"task.dataset": "news", "task.max-users": 3}, "task.max-users"),
    "dirichlet for news": ({"task.dataset": "news", "task.dirichlet-alpha": 1.0}, "task.dirichlet-alpha"),
    "dirichlet for text": ({**LM, "task.dirichlet-alpha": 1.0}, "task.dirichlet-alpha"),
    "topics for tweets": ({"task.topics-liked": 3}, "task.topics-liked"),
    "speeches for tweets": ({"task.min-speeches": 20}, "task.min-speeches"),
    "chat format for tweets": ({"task.lm-format": "chat"}, "task.lm-format"),
    "validation share for test": ({"task.validation-fraction": 0.3}, "task.validation-fraction"),
    "patterns without scrub": ({"task.pii-patterns": "x+"}, "task.pii-patterns"),
    "bad pattern": ({"task.pii-scrub": True, "task.pii-patterns": "(x"}, "task.pii-patterns"),
    "chat examples without chat": ({**LM, "client.chat-examples": 2}, "client.chat-examples"),
    "chat pick for a classifier": ({"client.chat-pick": "retrieve"}, "client.chat-pick"),
    "chat pool without retrieve": (
        {**LM, "task.lm-format": "chat", "client.chat-pool": 8},
        "client.chat-pool",
    ),
    "ghost with a causal LM": ({**LM, "dp.grad-sample-mode": "ghost"}, "dp.grad-sample-mode"),
    "ghost per tensor": ({"dp.grad-sample-mode": "ghost", "dp.clipping": "per-tensor"}, "dp.clipping"),
    "user keys without user level": ({"dp.user-epsilon": 2.0}, "dp.user-epsilon"),
    "adaptive keys with fixed clipping": ({**USER, "dp.user-clip-lr": 0.5}, "dp.user-clip-lr"),
    "even shares": ({**SECAGG, "secagg.num-shares": 4, "fed.min-clients": 5}, "secagg.num-shares"),
    "threshold at shares": ({**SECAGG, "secagg.threshold": 3}, "secagg.threshold"),
    "too few clients for the shares": ({**SECAGG, "fed.min-clients": 2}, "fed.min-clients"),
    "secagg with user level": ({**SECAGG, **USER}, "dp.user-level"),
    "secagg with nothing shared": ({**SECAGG, "personalization.mode": "local"}, "personalization.mode"),
}

GOOD: dict[str, dict[str, Any]] = {
    "defaults": {},
    "file": FILE,
    "chat with retrieve": {
        **LM,
        "task.lm-format": "chat",
        "client.chat-pick": "retrieve",
        "client.chat-pool": 9,
    },
    "personal part of an LM": {**LM, "model.personal-part": "last-block"},
    "adaptive user level": {**USER, "dp.user-clipping": "adaptive", "dp.user-clip-lr": 0.5},
    "secagg settings kept while off": {"secagg.num-shares": 5, "secagg.threshold": 3},
    "secagg": {**SECAGG, "secagg.num-shares": 5, "secagg.threshold": 3, "fed.min-clients": 5},
    "validation": {"task.evaluate-on": "validation", "task.validation-fraction": 0.3},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_combination_fails_when_the_config_is_built(case: str) -> None:
    run_config, key = BAD[case]
    with pytest.raises(ConfigError) as info:
        Config.from_run_config(run_config)
    assert key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(GOOD))
def test_a_good_combination_builds(case: str) -> None:
    Config.from_run_config(GOOD[case])


def test_every_shipped_config_builds() -> None:
    from simulations.run import load_settings

    for path in sorted((ROOT / "simulations" / "configs").glob("*.toml")):
        if "[run-config]" in path.read_text(encoding="utf-8"):  # not a [mode.<name>] settings file
            load_settings(path)


def test_the_rules_are_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "## Rules that join keys" in doc and all(rule in doc for rule in RULES)


def test_simulate_stops_on_a_bad_combination_before_any_run_folder(tmp_path: Path) -> None:
    demo = ROOT / "simulations" / "configs" / "demo.toml"
    argv = [str(BIN / "fedpers"), "simulate", "-c", str(demo), "--set", "model.personal-part=bias"]
    argv += ["--run-dir", str(tmp_path / "run")]
    result = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.personal-part" in lines[0], lines
    assert not (tmp_path / "run").exists()
