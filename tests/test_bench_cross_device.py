"""``fedpers bench cross-device``: cells, tuning on validation, and the output contract of issue #31."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import Config
from common.errors import ConfigError
from simulations.bench import cross_device as X
from simulations.bench.grid import run_grid

TINY_XDEV = """
[simulation]
num-clients = 6

[run-config]
"model.name" = "tiny"
"task.dataset" = "tweets"
"task.partitioner" = "fixed-size"
"task.dirichlet-alpha" = 1.0
"task.train-size" = 12
"task.test-size" = 6
"fed.num-rounds" = 3
"fed.fraction-train" = 0.5
"dp.enabled" = false
"dp.user-level" = true
"dp.user-noise-multiplier" = 0.0
"dp.user-epsilon" = 8.0
"client.report-before-after" = false
"""


@pytest.fixture
def tiny_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = tmp_path / "xdev-tiny.toml"
    path.write_text(TINY_XDEV)
    monkeypatch.setattr(X, "SETTINGS", {"tiny": path})
    monkeypatch.setattr(X, "TUNED", tmp_path / "tuned.toml")
    return "tiny"


def test_every_cell_of_the_shipped_grid_is_a_valid_config() -> None:
    cells = X.plan(list(X.SETTINGS), list(X.PRIVACY), X.MODES, [0, 1], {})
    for cell in cells:
        cfg = Config.from_run_config(cell.overrides)
        lora = cell.key.split("/")[2] in ("fedper-lora", "fedsa", "ffa")  # the LoRA-sharing modes: rank 8
        assert cfg.lora.r == (8 if lora else 0) and cell.num_clients == 1000
        if cfg.personalization.mode == "local":  # converged alone: one round, everyone, nothing released
            assert (cfg.fed.num_rounds, cfg.fed.fraction_train, cfg.dp.user_level) == (1, 1.0, False)
        else:
            assert cfg.fed.fraction_train == 0.05 and cfg.fed.num_rounds == 100
    keys = [c.key for c in cells]
    assert {
        Config.from_run_config(c.overrides).personalization.mode for c in cells if "/fedper-lora/" in c.key
    } == {"fedper"}
    assert len(keys) == len(set(keys)) and sum("/local/" in k for k in keys) == 3 * 2  # local once per seed
    assert len({c.group for c in cells}) == 3 * 2  # one group (one encoding) per setting and seed
    for cell in X.tune_cells(list(X.SETTINGS), list(X.CANDIDATES), ["user-eps8", "user-eps2"]):
        assert Config.from_run_config(cell.overrides).task.evaluate_on == "validation"
    with pytest.raises(ConfigError, match="unknown setting"):
        X.setting_overrides("tweets-a9")
    with pytest.raises(ConfigError, match="unknown mode"):
        X.cell_overrides("news", "user-eps8", "fedsa-r2", 0)


def test_tuned_values_apply_per_setting_and_mode(tiny_setting: str, tmp_path: Path) -> None:
    X.write_tuned({"tiny.fedbias": {"train.local-epochs": 5}}, "cmd", X.TUNED)
    X.write_tuned({"tweets-a1.0.local": {"train.local-epochs": 30}}, "cmd", X.TUNED)  # merged, not replaced
    tuned = X.load_tuned(X.TUNED)
    assert X.tuned_for(tuned, "tiny", "fedbias") == {"train.local-epochs": 5}
    assert X.tuned_for(tuned, "tweets-a1.0", "local") == {"train.local-epochs": 30}
    assert X.tuned_for(tuned, "tiny", "local") == {}
    assert X.tuned_for(tuned, "tweets-a0.3", "local") == {"train.local-epochs": 30}  # SAME_AS its corpus
    assert "tweets-a0.3" not in X.TUNED.read_text()  # the alias is applied when read, never written
    (local,) = [c for c in X.plan(["tiny"], ["user-eps8"], ["fedbias"], [0], tuned)]
    assert local.overrides["train.local-epochs"] == 5


def test_a_tiny_grid_writes_contract_records_and_tuning_chooses_on_validation(
    tiny_setting: str, tmp_path: Path
) -> None:
    cells = X.plan(["tiny"], ["user-eps8"], ["local", "fedbias"], [0], {})
    done = run_grid(tmp_path / "run", cells, workers=1)
    recs = X.records(done)
    assert [(r["mode"], r["privacy"]["scope"]) for r in recs] == [("local", "none"), ("fedbias", "user")]
    fed = recs[1]
    assert fed["population"] == 6 and fed["cohort"] == 3.0 and fed["rounds"] == 3 and fed["seed"] == 0
    assert 0 < fed["privacy"]["epsilon"] <= 8.0 and fed["privacy"]["delta"] == 1e-6
    assert fed["privacy"]["within_user_epsilon"] > fed["privacy"]["epsilon"]  # one user's data changed
    assert len(fed["per_client"]) == 6 and {c["user"] for c in fed["per_client"]} == set(
        X.get_task(Config.from_run_config(cells[0].overrides)).users(6)
    )
    assert all(0 <= c["accuracy"] <= 1 for c in fed["per_client"])
    json.dumps(recs)  # the summary file is plain JSON
    text = X.table(recs)
    assert "| tiny | user-eps8 | fedbias | 1 |" in text and "pts [" in text  # paired against local

    tune = [c for c in X.tune_cells(["tiny"], ["local"])]
    finished = run_grid(tmp_path / "tune", tune, workers=1)
    chosen = X.choose(tune, finished)
    best = max(tune, key=lambda c: finished[c.key]["acc-mean"])
    assert chosen == {"tiny.local": {"train.local-epochs": best.overrides["train.local-epochs"]}}
    assert "validation acc mean" in X.tune_table(tune, finished)


def test_best_is_the_personal_mode_chosen_on_validation_and_also_adds_cells(tiny_setting: str) -> None:
    cells = [c for c in X.tune_cells(["tiny"], ["fedbias", "fedper", "local"])]
    done = {c.key: {"acc-mean": 0.5} for c in cells}
    top = next(c for c in cells if "/fedper/" in c.key)
    done[top.key] = {"acc-mean": 0.9}
    done[next(c for c in cells if "/local/" in c.key).key] = {"acc-mean": 0.95}  # local never "best"
    chosen = X.choose(cells, done)
    assert chosen["tiny.best"] == {"mode": "fedper"}
    assert (
        chosen["tiny.fedper"]["personalization.shared-projection"]
        == top.overrides["personalization.shared-projection"]
    )
    X.write_tuned(chosen, "cmd", X.TUNED)
    tuned = X.load_tuned(X.TUNED)
    also = X.parse_also(["user-eps2:best", "none:best:1"])
    planned = X.plan(["tiny"], ["user-eps8"], ["local", "fedavg-ft", "best"], [0, 1], tuned, also)
    keys = [c.key for c in planned]
    assert keys[:5] == [
        "tiny/none/local/seed0", "tiny/user-eps8/fedavg-ft/seed0", "tiny/user-eps8/fedper/seed0",
        "tiny/user-eps2/fedper/seed0", "tiny/none/fedper/seed0",
    ]  # fmt: skip
    assert "tiny/none/fedper/seed1" not in keys and "tiny/user-eps2/fedper/seed1" in keys
    fedper = next(c for c in planned if c.key == "tiny/user-eps8/fedper/seed0")
    assert fedper.overrides["personalization.final-fit"] == 30  # the chosen candidate's values
    for cell in planned:  # e.g. non-private fedper: the tuned user-level clipping is dropped, not refused
        Config.from_run_config(cell.overrides)
    with pytest.raises(ConfigError, match="privacy:mode"):
        X.parse_also(["eps2:best"])
    with pytest.raises(ConfigError, match="no best mode chosen"):
        X.plan(["tiny"], ["user-eps8"], ["best"], [0], {})


def test_tuning_at_a_second_budget_is_kept_apart_and_used_only_at_that_budget(tiny_setting: str) -> None:
    cells = X.tune_cells(["tiny"], ["local", "fedper"], ["user-eps8", "user-eps2"])
    keys = [c.key for c in cells]
    assert sum("/local/" in k for k in keys) == len(X.CANDIDATES["local"])  # releases nothing: once
    assert {k.split("/")[1] for k in keys if "/fedper/" in k} == {"tiny", "tiny@user-eps2"}
    at2 = [c for c in cells if c.key.startswith("tune/tiny@user-eps2/fedper/")]
    assert len(at2) == len(X.candidates("fedper", "user-eps2")) and all(
        c.overrides["dp.user-epsilon"] == 2.0 and c.overrides["task.evaluate-on"] == "validation" for c in at2
    )
    done = {c.key: {"acc-mean": 0.5} for c in cells}
    top8 = next(c for c in cells if c.key.startswith("tune/tiny/fedper/"))
    top2 = next(c for c in at2 if "num-rounds=200" in c.key)  # the 200-round candidate
    done[top8.key], done[top2.key] = {"acc-mean": 0.9}, {"acc-mean": 0.8}
    chosen = X.choose(cells, done)
    assert chosen["tiny.best"] == chosen["tiny@user-eps2.best"] == {"mode": "fedper"}
    assert chosen["tiny@user-eps2.fedper"]["fed.num-rounds"] == 200
    X.write_tuned(chosen, "cmd", X.TUNED)
    tuned = X.load_tuned(X.TUNED)
    planned = {c.key: c for c in X.plan(["tiny"], ["user-eps8", "user-eps2"], ["best"], [0], tuned)}
    assert planned["tiny/user-eps2/fedper/seed0"].overrides["fed.num-rounds"] == 200  # tuned at ε 2
    assert planned["tiny/user-eps8/fedper/seed0"].overrides["fed.num-rounds"] == 3  # the setting's own
    assert X.tuned_for(tuned, "tiny", "fedper", "virtual-eps8") == X.tuned_for(tuned, "tiny", "fedper")
    with pytest.raises(ConfigError, match="user-level budgets"):
        X.tune_cells(["tiny"], ["fedper"], ["none"])


def test_same_as_settings_take_their_source_tables_at_every_budget(tmp_path: Path) -> None:
    path = tmp_path / "tuned.toml"
    X.write_tuned({"tweets-a1.0@user-eps2.fedbias": {"train.local-epochs": 1}}, "cmd", path)
    tuned = X.load_tuned(path)
    assert X.tuned_for(tuned, "tweets-a0.3", "fedbias", "user-eps2") == {"train.local-epochs": 1}
    assert X.tuned_for(tuned, "tweets-a0.3", "fedbias") == {}


def _rec(budget: str, mode: str, accs: list[float], seed: int = 0) -> dict:
    mean, p10 = sum(accs) / len(accs), sorted(accs)[len(accs) // 10]
    return {
        "setting": "news", "mode": mode, "seed": seed, "privacy": {"budget": budget},
        "accuracy": {"mean": mean, "median": mean, "p10": p10},
        "per_client": [{"user": f"u{i}", "accuracy": a} for i, a in enumerate(accs)],
    }  # fmt: skip


def test_targets_compare_the_best_personal_mode_with_local_fedavg_ft_and_the_kept_share() -> None:
    local = [0.5] * 10
    recs = [
        _rec("none", "local", local),
        _rec("user-eps8", "fedper", [0.6] * 10),  # +10 points everywhere
        _rec("user-eps8", "fedavg-ft", [0.59] * 10),  # fedper only +1 over it
        _rec("user-eps2", "fedper", [0.49] * 10),  # below local
        _rec("none", "fedper", [0.7] * 10),
        _rec("virtual-eps8", "fedper", [0.68] * 10),  # keeps 90 % of the 20-point gain
        _rec("none", "local", [0.9] * 10, seed=1),  # a seed fedper lacks: left out of every comparison
    ]
    rows = {line.split(" | ")[1]: line for line in X.targets(recs).splitlines()[2:]}
    assert rows["ε 8: mean ≥ local + 5"].endswith("| met |") and "+10.0 pts" in rows["ε 8: mean ≥ local + 5"]
    assert rows["ε 8: p10 ≥ local p10 + 3"].endswith("| met |")
    assert rows["ε 8: mean ≥ DP fedavg-ft + 2"].endswith("| MISSED |")
    assert rows["ε 2: mean ≥ local"].endswith("| MISSED |")
    kept = next(v for k, v in rows.items() if k.startswith("deployment-scale"))
    assert "90 % kept" in kept and kept.endswith("| met |")
    assert "not run yet" in X.targets(recs[:2])  # fedavg-ft and ε 2 missing: open, not met


def test_a_wrong_tuning_budget_fails_before_any_run_folder_exists(tmp_path: Path) -> None:
    from simulations.bench.commands import bench_cross_device

    with pytest.raises(ConfigError, match="user-level budgets"):
        bench_cross_device(["news"], ["none"], ["fedper"], [0], 1, folder=tmp_path / "run", tune=True)
    assert not (tmp_path / "run").exists()
