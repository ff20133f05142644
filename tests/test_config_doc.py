"""docs/configuration.md is generated from the schema and stays in sync with it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from common.config import DEFAULTS, allowed_keys
from research import config_doc

ROOT = Path(__file__).resolve().parents[1]


def _key_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith('"')]


def test_committed_reference_is_up_to_date() -> None:
    committed = config_doc.DOC.read_text(encoding="utf-8") if config_doc.DOC.is_file() else ""
    assert committed == config_doc.render(), (
        "docs/configuration.md is out of date with common/config.py or common/defaults.toml: "
        "run python -m research.config_doc --write"
    )


def test_every_key_is_documented_with_its_comment() -> None:
    entries = [e for rows in config_doc.run_config_entries().values() for e in rows]
    assert [e.key for e in entries] == list(allowed_keys())
    text = config_doc.render()
    for e in entries:
        assert f"| `{e.key}` | {e.type} | {e.default} |" in text
    accountant = next(e for e in entries if e.key == "dp.accountant")
    assert (accountant.type, accountant.default, accountant.allowed) == ("string", '`"prv"`', "`prv`, `rdp`")
    assert accountant.description == r"prv \| rdp"  # the comment, its bar escaped for the table


def test_a_key_without_a_comment_is_refused(tmp_path: Path) -> None:
    text = DEFAULTS.read_text(encoding="utf-8")
    bare = re.sub(r'^("lora\.r" = 8)\s*#.*$', r"\1", text, flags=re.M)
    assert bare != text
    (tmp_path / "defaults.toml").write_text(bare, encoding="utf-8")
    with pytest.raises(ValueError, match="'lora.r' has no comment"):
        config_doc.run_config_entries(tmp_path / "defaults.toml")


def test_pyproject_and_defaults_carry_the_same_comments() -> None:
    """tests/test_config.py compares values; the descriptions the reference shows must agree too."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = pyproject.split("[tool.flwr.app.config]\n", 1)[1].split("\n[", 1)[0]
    assert _key_lines(table) == _key_lines(DEFAULTS.read_text(encoding="utf-8"))


def test_simulation_keys_are_the_documented_ones() -> None:
    from simulations.run import SIM_KEYS, SimSettings

    documented = {e.key: e for e in config_doc.SIMULATION}
    assert set(documented) == SIM_KEYS
    assert documented["num-clients"].default == f"`{SimSettings.num_clients}`"
    assert documented["client-cpus"].default == f"`{SimSettings.client_cpus}`"


def test_agent_limits_match_the_command() -> None:
    from cli.deploy import agent

    params = inspect.signature(agent).parameters
    documented = {e.key: e for e in config_doc.AGENT}
    assert set(documented) == {"--max-epsilon", "--delta", "--allow-no-dp"}
    assert documented["--max-epsilon"].default == f"`{params['max_epsilon'].default.default}`"
    assert documented["--delta"].default == f"`{params['delta'].default.default}`"
    assert params["allow_no_dp"].default.default is False and documented["--allow-no-dp"].default == "off"


def test_write_refreshes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "docs" / "configuration.md"
    monkeypatch.setattr(config_doc, "DOC", target)
    assert config_doc.main(["--write"]) == 0
    assert target.read_text(encoding="utf-8") == config_doc.render()
