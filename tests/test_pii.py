"""PII scrubbing replaces identifiers and leaves ordinary text alone."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.pii import parse_patterns, scrub


def test_builtin_identifiers_are_replaced() -> None:
    text = "mail jo.doe+x@example.co.uk or call +44 20 7946 0958, see https://t.co/abc and @bob_99!"
    out = scrub(text)
    for leaked in ("jo.doe", "example.co.uk", "7946", "t.co", "bob_99"):
        assert leaked not in out
    assert out == "mail [EMAIL] or call [PHONE], see [URL] and [USER]!"


def test_ordinary_text_and_numbers_stay() -> None:
    text = "Won 3-1 in 2024, 45 minutes late; price 19.99"
    assert scrub(text) == text


def test_extra_patterns_and_bad_patterns() -> None:
    extra = parse_patterns("\n  ACC-\\d{6}  \n\nsecret\\w+\n")
    assert extra == ("ACC-\\d{6}", "secret\\w+")
    assert scrub("account ACC-123456 secretsauce", extra) == "account [PII] [PII]"
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        scrub("x", ("(unclosed",))


def test_client_data_is_scrubbed_when_asked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from common.config import Config
    from common.data import load_client_data

    path = tmp_path / "d.csv"
    rows = ["text,label,user"] + [
        f"ping me at u{i}@mail.com or @friend{i},{'pos' if i % 2 else 'neg'},a" for i in range(9)
    ]
    path.write_text("\n".join(rows) + "\n")
    base = dataclasses.replace(Config.from_run_config({}).task, dataset="file", labels="neg,pos", test_size=3)
    plain = load_client_data(base, 0, 1, str(path))
    assert any("@mail.com" in t for t in plain.train_texts)
    clean = load_client_data(dataclasses.replace(base, pii_scrub=True, pii_patterns="ping"), 0, 1, str(path))
    assert all(t.startswith("[PII] me at [EMAIL] or [USER]") for t in clean.train_texts + clean.test_texts)
