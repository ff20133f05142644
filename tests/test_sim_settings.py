"""Simulation settings: per-mode tables ([mode.<name>], or a tuned file named by mode-settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from simulations.run import load_settings


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_each_mode_gets_its_own_table_and_set_options_win(tmp_path: Path) -> None:
    _write(tmp_path / "tuned.toml", '[mode.local]\n"train.lr-head" = 0.2\n"train.local-epochs" = 4\n')
    cfg = _write(
        tmp_path / "sim.toml",
        '[simulation]\nnum-clients = 3\ncompare = ["fedper", "local"]\nmode-settings = "tuned.toml"\n'
        '[run-config]\n"train.lr-head" = 0.5\n'
        '[mode.fedper]\n"train.lr-lora" = 0.3\n[mode.local]\n"train.local-epochs" = 2\n',
    )
    s = load_settings(cfg, {"train.lr-head": 0.9})
    local, fedper = s.for_mode("local"), s.for_mode("fedper")
    assert local["train.local-epochs"] == 2  # the config's own table refines the tuned file
    assert local["train.lr-head"] == 0.9 and fedper["train.lr-head"] == 0.9  # --set beats every table
    assert fedper["train.lr-lora"] == 0.3 and "train.lr-lora" not in local
    assert s.for_mode("fedavg") == {**s.overrides, "personalization.mode": "fedavg"}
    assert load_settings(cfg).for_mode("local")["train.lr-head"] == 0.2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[mode.fedpr]\n"train.lr-head" = 0.2\n', "unknown mode"),
        ('[mode.local]\n"train.lr-hed" = 0.2\n', "train.lr-hed"),
        ('[mode.local]\n"train.lr-head" = -1.0\n', "out of range"),
        ('[simulation]\nmode-settings = "missing.toml"\n', "does not exist"),
    ],
)
def test_bad_mode_tables_fail_clearly(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(_write(tmp_path / "sim.toml", text))


def test_lm_tuning_chooses_per_mode_and_its_file_feeds_the_simulation(tmp_path: Path) -> None:
    from simulations.bench.lm_tune import choose, lm_tune_cells, write_tuned_lm

    cells = lm_tune_cells(["e1", "e4-lora0.5", "bias-c0.05"], ["fedper", "local"])
    ppl = {"e1/fedper": 150.0, "e4-lora0.5/fedper": 140.0, "e1/local": 145.0, "e4-lora0.5/local": 146.0}
    ppl |= {"bias-c0.05/fedper": 141.0, "bias-c0.05/local": 130.0}
    done = {
        c.key: {"perplexity-mean": ppl[c.key.split("/", 1)[1]], "perplexity-p90": 200.0, "wall-seconds": 1.0}
        for c in cells
    }
    assert all(c.overrides["task.evaluate-on"] == "validation" for c in cells)  # never tuned on test
    chosen = choose(cells, done)
    assert chosen["fedper"]["train.lr-lora"] == 0.5 and chosen["fedper"]["train.local-epochs"] == 4
    assert "model.personal-part" not in chosen["fedper"]  # e4-lora0.5 ran with the workload's part
    assert chosen["local"]["model.personal-part"] == "bias" and chosen["local"]["dp.max-grad-norm"] == 0.05
    tuned = tmp_path / "tuned.toml"
    write_tuned_lm(chosen, cells, done, "fedpers bench lm-tune", tuned)
    lm = '[run-config]\n"model.name" = "tiny-lm"\n"task.dataset" = "shakespeare"\n'  # the part is an LM's
    sim = _write(tmp_path / "sim.toml", '[simulation]\nmode-settings = "tuned.toml"\n' + lm)
    assert load_settings(sim).for_mode("fedper")["train.lr-lora"] == 0.5
    assert load_settings(sim).for_mode("local")["model.personal-part"] == "bias"  # strings written as TOML
    with pytest.raises(ValueError, match="unknown candidate"):
        lm_tune_cells(["e9"])


def test_tune_server_lr_candidates_only_for_shared_modes_and_chosen_on_validation(tmp_path: Path) -> None:
    from simulations.bench.tune import choose, tune_cells, write_tuned

    cells = tune_cells(["fedper", "local"], server_lrs=[1.0, 4.0])
    assert all(c.overrides["task.evaluate-on"] == "validation" for c in cells)
    assert not any(
        "fed.server-lr" in c.overrides for c in cells if c.overrides["personalization.mode"] == "local"
    )
    slr = [c for c in cells if "fed.server-lr" in c.overrides]
    assert slr and all(c.key.endswith("-slr4") and c.overrides["fed.server-lr"] == 4.0 for c in slr)
    done = {c.key: {"acc-mean": 0.9 if c in slr else 0.8, "acc-p10": 0.5} for c in cells}
    chosen = choose(cells, done)
    assert chosen["fedper"]["fed.server-lr"] == 4.0 and "fed.server-lr" not in chosen["local"]
    path = tmp_path / "tuned.toml"
    write_tuned(chosen, cells, done, "fedpers bench tune", path)
    assert '"fed.server-lr" = 4.0' in path.read_text()
    with pytest.raises(ConfigError, match="positive"):
        tune_cells(["fedper"], server_lrs=[0.0])
    with pytest.raises(ConfigError, match="unknown mode"):
        tune_cells(["fedprox"])


def test_a_missing_or_malformed_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    bad = _write(tmp_path / "bad.toml", "[simulation\nnum-clients = 2\n")
    for path, says in ((tmp_path / "nope.toml", "does not exist"), (bad, "is not valid TOML")):
        with pytest.raises(ConfigError, match=says):
            load_settings(path)
        res = CliRunner().invoke(app, ["simulate", "--config", str(path), "--run-dir", str(tmp_path / "run")])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output
        assert not (tmp_path / "run").exists()


def test_only_the_modes_that_will_run_are_validated(tmp_path: Path) -> None:
    """lora.r = 0 has no LoRA to share: fine for the modes compared, whatever the default mode is."""
    cfg = _write(
        tmp_path / "sim.toml", '[simulation]\ncompare = ["fedbias", "local"]\n[run-config]\n"lora.r" = 0\n'
    )
    assert load_settings(cfg).compare == ("fedbias", "local")
    plain = _write(tmp_path / "plain.toml", '[run-config]\n"lora.r" = 0\n')
    assert load_settings(plain, modes=("fedavg",)).overrides["lora.r"] == 0  # --compare fedavg
    with pytest.raises(ConfigError, match="shares LoRA tensors"):
        load_settings(plain)  # the default mode, fedper, would run
