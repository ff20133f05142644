"""The attribution diagnostic: its reader names authors from real speeches, and a tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import Config
from common.data import load_client_data
from common.errors import DataError, StateError
from research.lm_attribution import (
    Reader,
    add_uncopied,
    attribute,
    char_grams,
    copied_share,
    generate_answers,
    main,
    paired_ranks,
    sign_test,
    strip_copied,
)

LM = {
    "model.name": "tiny-lm",
    "model.frozen-layers": 1,
    "lora.target-modules": "q_proj,v_proj",
    "task.dataset": "shakespeare",
    "task.min-speeches": 50,
    "task.train-size": 40,
    "task.test-size": 10,
    "task.max-length": 48,
    "task.lm-format": "chat",
    "train.batch-size": 10,
    "train.threads": 1,
    "fed.num-rounds": 1,
    "dp.enabled": False,
    "client.report-before-after": False,
    "client.chat-examples": 2,
    "client.chat-pick": "longest",
}


def test_char_grams_and_copied_share() -> None:
    assert char_grams("Ab  c", 3) == {" ab": 1, "ab ": 1, "b c": 1, " c ": 1}
    turns = [("who goes there", "Nay, answer me: stand and unfold yourself.")]
    assert copied_share("stand and unfold yourself.", turns) == 1.0
    assert copied_share("stand and unfold thyself now", turns) == pytest.approx(1 / 3)
    assert copied_share("stand and unfold yourself.", []) == 0.0
    assert copied_share("two words", turns) == 0.0  # no trigram at all
    # every word of a copied trigram goes, whatever its case; the rest stays in order
    assert strip_copied("Well: Stand and unfold yourself. now, sir", turns) == "Well: now, sir"
    assert strip_copied("stand and unfold thyself now", turns) == "thyself now"
    assert strip_copied("stand and unfold yourself.", turns) == ""
    assert strip_copied("stand and unfold yourself.", []) == "stand and unfold yourself."


def test_reader_names_the_author_of_real_held_out_speeches() -> None:
    """Eight real roles: each role's own test speeches, joined, are read as that role's."""
    task = Config.from_run_config(LM).task
    data = [load_client_data(task, i, 8) for i in range(8)]
    reader = Reader({d.user: d.train_texts for d in data})
    assert reader.ranking(" ".join(data[3].train_texts))[0] == data[3].user  # its own profile
    named = [reader.ranking(" ".join(d.test_texts))[0] == d.user for d in data]
    assert sum(named) >= 6, named  # chance: 1 of 8
    s = reader.scores("anything at all")
    assert s.shape == (8,) and ((s >= 0) & (s <= 1 + 1e-9)).all()


def test_hub_correction_stops_one_central_profile_taking_every_text() -> None:
    """``h`` writes a bit like both ``a`` and ``b``: the plain reader names it for most texts."""
    reader = Reader({"a": ["xyz xyz xyz"], "b": ["pqr pqr pqr"], "h": ["xyz pqr xyz pqr"]})
    texts, truth = ["xyz xyz pqr", "xyz pqr xyz", "pqr pqr xyz", "pqr xyz pqr"], ["a", "a", "b", "b"]
    plain, hub = reader.rankings(texts), reader.rankings(texts, hub=True)
    assert plain == [reader.ranking(t) for t in texts] and reader.rankings([], hub=True) == []
    assert [r[0] for r in plain] == ["h", "h", "b", "h"]
    assert [r[0] for r in hub] == ["a", "h", "b", "h"]  # "xyz xyz pqr" is unusually close to a
    assert sum(r[0] == u for r, u in zip(hub, truth, strict=True)) == 2  # plain: 1


def test_reader_rejects_what_it_cannot_read() -> None:
    with pytest.raises(DataError, match="at least two users"):
        Reader({"a": ["text"]})
    with pytest.raises(DataError, match="no text to profile for b"):
        Reader({"a": ["text"], "b": ["  "]})
    with pytest.raises(DataError, match="n >= 1"):
        Reader({"a": ["x"], "b": ["y"]}, n=0)


def test_paired_ranks_and_the_sign_test() -> None:
    pair = paired_ranks([0, 3, 2, 5, 1], [1, 3, 4, 2, 1])
    assert (pair["better"], pair["worse"], pair["ties"]) == (2, 1, 2)
    assert pair["p"] == pytest.approx(1.0)  # 2 of 3 is what a fair coin gives most often
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)  # the two all-one-side splits of 10
    assert sign_test(86, 59) == pytest.approx(0.0305, abs=5e-4)
    assert sign_test(0, 0) == 1.0
    with pytest.raises(DataError, match="as many texts"):
        paired_ranks([1, 2], [1])


def test_attribution_on_a_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.sequential import run_sequential

    run_sequential(LM, 3, tmp_path / "run" / "fedper")
    clients = tmp_path / "run" / "fedper" / "clients"
    gen = generate_answers(clients, cues=2, tokens=6, seed=1)
    assert len(gen["users"]) == 3 and set(gen["answers"]) == set(gen["users"])
    for i, user in enumerate(gen["users"]):
        records = gen["answers"][user]
        assert len(records) == 2 and all(r["turns-of"] == gen["users"][(i + 1) % 3] for r in records)
        assert all(0.0 <= r[f"{c}-copied"] <= 1.0 for r in records for c in ("none", "own", "other"))
        assert all(r["none-copied"] == 0.0 and r["none-uncopied"] == r["none"] for r in records)
        assert len(gen["profiles"][user]) == 40 - 2  # the two kept turns are not the user's profile
    assert gen == generate_answers(clients, cues=2, tokens=6, seed=1)  # seeded: the same answers again
    summary = attribute(gen)
    assert summary["users"] == 3 and summary["real"]["texts"] == 6 and summary["own"]["texts"] == 6
    assert 0.0 <= summary["other"]["turn-owner"] <= 1.0 and 1.0 <= summary["own"]["mean-rank"] <= 3.0
    for pair in summary["paired"].values():  # one comparison per answered cue
        assert pair["better"] + pair["worse"] + pair["ties"] == 6 and 0.0 < pair["p"] <= 1.0
    assert sum(c for _, c in summary["own"]["most-named"]) <= 6 and 1 / 3 <= summary["chance-play"] <= 1.0
    assert attribute(gen, uncopied=True)["answers-read"] == "uncopied" and summary["answers-read"] == "whole"
    # answers stored without their uncopied text get it again from the states, the same
    old = json.loads(json.dumps(gen))
    for records in old["answers"].values():
        for r in records:
            for c in ("none", "own", "other"):
                del r[f"{c}-uncopied"]
    with pytest.raises(DataError, match="give the run's --run-dir"):
        attribute(old, uncopied=True)
    add_uncopied(old, clients)
    assert old == gen
    old["answers"][gen["users"][0]][0]["own-copied"] += 0.5  # not what these states answered
    with pytest.raises(StateError, match="did not give"):
        add_uncopied(old, clients)
    out = tmp_path / "attr.json"
    main(
        [
            "--run-dir",
            str(tmp_path / "run"),
            "--cues",
            "1",
            "--tokens",
            "4",
            "--users",
            "2",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["summary"]["users"] == 2
    main(["--report", str(out)])
    report = capsys.readouterr().out.strip()
    assert "| answers, own turns | 2 |" in report and printed.rstrip().endswith(report)
    main(["--report", str(out), "--hub"])
    assert "Reader: hub-corrected" in capsys.readouterr().out and "hub-corrected" not in report
    main(["--report", str(out), "--uncopied", "--run-dir", str(tmp_path / "run")])
    assert "without their copied words" in capsys.readouterr().out and "copied words" not in report
    with pytest.raises(SystemExit, match="is not a folder"):
        main(["--run-dir", str(tmp_path / "run"), "--mode", "local"])
