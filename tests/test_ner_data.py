"""Tests of common.spans (BIO spans, entity F1) and common.ner_data (WNUT-16 users, splits, baseline)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common import ner_data
from common.config import Config, TaskConfig
from common.errors import ConfigError, DataError
from common.ner_data import (
    PROFILES,
    TAG_NAMES,
    TAG_TYPES,
    TaggedData,
    assign_users,
    baseline_f1,
    corpus,
    corpus_stats,
    load_tagged_client,
    majority_tags,
    parse_corpus,
    user_profile,
)
from common.spans import entity_counts, f1, render, spans


def _task(**changes: object) -> TaskConfig:
    return dataclasses.replace(Config.from_run_config({}).task, **changes)


# --- spans ------------------------------------------------------------------------------------------


def test_spans_bio() -> None:
    tags = ["B-person", "I-person", "O", "B-geo-loc", "B-geo-loc", "I-geo-loc"]
    assert spans(tags) == {(0, 2, "person"), (3, 4, "geo-loc"), (4, 6, "geo-loc")}
    assert spans([]) == set() and spans(["O", "O"]) == set()


def test_spans_conlleval_i_opens_a_new_entity() -> None:
    assert spans(["O", "I-person", "I-person"]) == {(1, 3, "person")}  # I after O
    assert spans(["I-person"]) == {(0, 1, "person")}  # I at the start
    assert spans(["B-person", "I-geo-loc", "I-geo-loc", "O"]) == {(0, 1, "person"), (1, 3, "geo-loc")}


def test_spans_rejects_non_bio_tags() -> None:
    with pytest.raises(ValueError, match="not a BIO tag"):
        spans(["O", "X-person"])
    with pytest.raises(ValueError, match="not a BIO tag"):
        spans(["B-"])


def test_entity_counts_and_f1() -> None:
    gold = [["B-person", "I-person", "O"], ["B-geo-loc", "O"]]
    pred = [["B-person", "O", "O"], ["B-geo-loc", "B-company"]]  # truncated span is wrong
    assert entity_counts(gold, pred) == (1, 3, 2)
    assert f1(1, 3, 2) == pytest.approx(0.4)
    assert f1(0, 0, 0) == 1.0  # nothing to find and nothing claimed
    assert f1(0, 1, 0) == 0.0 and f1(0, 0, 3) == 0.0 and f1(2, 2, 2) == 1.0
    with pytest.raises(ValueError, match="2 gold sentences but 1"):
        entity_counts(gold, pred[:1])
    with pytest.raises(ValueError, match="sentence 1"):
        entity_counts(gold, [pred[0], ["O"]])
    with pytest.raises(ValueError, match="inconsistent"):
        f1(3, 2, 2)


def test_render_marks_spans() -> None:
    words = ["I", "love", "New", "York", "and", "Sydney"]
    tags = ["O", "O", "B-geo-loc", "I-geo-loc", "O", "B-geo-loc"]
    assert render(words, tags) == "I love [New York]geo-loc and [Sydney]geo-loc"
    with pytest.raises(ValueError, match="2 words but 1 tags"):
        render(["a", "b"], ["O"])


# --- corpus and users -------------------------------------------------------------------------------


def test_corpus_and_tag_space() -> None:
    tweets = corpus()
    assert len(tweets) == 2394 and sum(len(w) for w, _ in tweets) == 46469
    assert sum(len(spans(tags)) for _, tags in tweets) == 1496
    assert len(TAG_TYPES) == 10 and len(TAG_NAMES) == 21 and TAG_NAMES[0] == "O"
    assert set(TAG_TYPES) == {t for types in PROFILES.values() for t in types}
    assert tweets[0][0][0] == "@paulwalk" and "B-facility" in tweets[0][1]


def test_user_names_and_profiles() -> None:
    assert user_profile(0) == ("entertainment-0", PROFILES["entertainment"])
    assert user_profile(7) == ("travel-1", ("geo-loc", "facility"))


def test_assignment_is_a_deterministic_partition() -> None:
    a = assign_users(10, 0)
    ner_data._assigned.cache_clear()
    assert assign_users(10, 0) == a  # recomputed, not just cached
    flat = sorted(i for user in a for i in user)
    tweets = corpus()
    assert len(flat) == len(set(flat)) == 2295  # every distinct tweet once (99 exact repeats left out)
    assert {tweets[i][0] for i in flat} == {words for words, _ in tweets}
    assert assign_users(10, 1) != a
    with pytest.raises(ConfigError):
        assign_users(0, 0)


def test_assignment_skews_towards_the_profile() -> None:
    rows = corpus_stats(10, 0)
    assert sum(r["tweets"] for r in rows) == 2295
    by_profile = {r["user"]: r["entities"] for r in rows}
    # the people users (person + other: 674 entities in all) see far more of theirs than entertainment
    assert by_profile["people-0"] > 2 * by_profile["entertainment-0"]


def test_user_view_and_split() -> None:
    task = _task()
    for pid in (0, 2, 3):
        data = load_tagged_client(task, pid, 10)
        assert data.tag_names == TAG_NAMES and data.user == user_profile(pid)[0]
        used = {TAG_NAMES[t][2:] for tags in data.train_tags + data.test_tags for t in tags if t}
        assert used and used <= set(data.profile)
        assert not set(data.train_words) & set(data.test_words)  # no tweet on both sides
        assert any(any(tags) for tags in data.test_tags)  # stratified: the test split has an entity
    for pid in range(20):  # even the smallest users' test splits hold an in-profile entity
        assert any(any(tags) for tags in load_tagged_client(task, pid, 20).test_tags)
    again = load_tagged_client(task, 3, 10)
    assert again == load_tagged_client(task, 3, 10)


def test_split_sizes_and_validation() -> None:
    small = load_tagged_client(_task(train_size=20, test_size=5), 1, 10)
    assert (len(small.train_words), len(small.test_words)) == (20, 5)
    full = load_tagged_client(_task(), 1, 10)
    assert len(full.train_words) + len(full.test_words) == len(assign_users(10, 42)[1])
    val = load_tagged_client(_task(evaluate_on="validation", validation_fraction=0.2), 1, 10)
    assert set(val.test_words) <= set(full.train_words) and not set(val.test_words) & set(full.test_words)
    assert any(any(tags) for tags in val.test_tags)


def test_too_many_clients_and_bad_partition() -> None:
    with pytest.raises(ConfigError, match="partition_id 10"):
        load_tagged_client(_task(), 10, 10)
    with pytest.raises(ConfigError, match="partition_id -1"):
        load_tagged_client(_task(), -1, 10)
    with pytest.raises(DataError, match="use fewer clients"):
        load_tagged_client(_task(), 0, 2000)


def test_majority_baseline() -> None:
    b, i = TAG_NAMES.index("B-person"), TAG_NAMES.index("I-person")
    tagger = majority_tags([("Bob", "Smith", "x"), ("smith", "x")], [(b, i, 0), (i, 0)])
    assert tagger(["bob", "SMITH", "new"]) == [b, i, 0]
    assert tagger(["smith", "bob"]) == [b, b]  # a leading I- is repaired into B-
    data = load_tagged_client(_task(), 1, 10)
    score = baseline_f1(data)
    assert 0.0 <= score <= 1.0 and baseline_f1(load_tagged_client(_task(), 1, 10)) == score


def test_tagged_data_validates() -> None:
    with pytest.raises(DataError, match="2 words, 1 tags"):
        TaggedData((("a", "b"),), ((0,),), (), (), TAG_NAMES, "u", ("person",))
    with pytest.raises(DataError, match="outside 0..20"):
        TaggedData((("a",),), ((21,),), (), (), TAG_NAMES, "u", ("person",))


def test_malformed_corpus_names_the_line(tmp_path: Path) -> None:
    good = "Bob\tB-person\nhi\tO\n\t\nyo\tO\n"
    path = tmp_path / "ner.txt"
    path.write_text(good)
    assert parse_corpus(path) == ((("Bob", "hi"), ("B-person", "O")), (("yo",), ("O",)))
    path.write_text(good + "broken line\n")
    with pytest.raises(DataError, match=r"ner\.txt:5: expected 'token<TAB>tag'"):
        parse_corpus(path)
    path.write_text(good + "x\tB-animal\n")
    with pytest.raises(DataError, match=r"ner\.txt:5: unknown tag 'B-animal'"):
        parse_corpus(path)


def test_the_commands_of_docs_ner_data_print_what_it_shows() -> None:
    """docs/ner-data.md's bash block runs as written and prints its text block (the per-user figures)."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "ner-data.md").read_text(encoding="utf-8")
    (commands,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    (shown,) = re.findall(r"```text\n(.*?)```", text, flags=re.S)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = "".join(
        subprocess.run(
            ["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True, check=True, timeout=300
        ).stdout
        for line in commands.splitlines()
        if line.strip()
    )
    assert out == shown
