"""The client's frozen-prefix features on its own disk, encrypted at rest with AES-GCM.

The frozen prefix's output is a function of the user's texts that can be inverted back towards them, so it
is kept like the personal state: encrypted, on the device, never sent. Unlike the state it holds no
privacy history and can always be recomputed, so a damaged, foreign or wrongly keyed file is logged and
replaced, never trusted and never fatal.

Layout of ``<folder>/<key>.features``: ``MAGIC | nonce (12 bytes) | AES-GCM(npz)``; the associated data
binds the magic and the key (the file name), so a file renamed to another key fails authentication. The
npz holds only the real tokens' hidden states (padding is zero and rebuilt from the mask), the mask and
the row order. The key comes from the node's key file or ``$FEDPERS_STATE_KEY`` as for the state, else
from ``<folder>/cache.key`` (created with mode 0600). At most ``max_files`` files are kept, the least
recently used go first.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import zipfile
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from client.state import load_key
from common.features import PrefixOutput
from common.fileio import write_bytes_atomic

MAGIC = b"FEDPERS-FEATURES-1\n"
SUFFIX = ".features"
KEY_FILE = "cache.key"
_KEY_RE = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger("flwr")


class FeatureCache:
    """Load and save prefix outputs (hidden, mask, order) in ``folder``, encrypted."""

    def __init__(self, folder: str | Path, key_file: str | Path | None = None, max_files: int = 8) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self._aead = AESGCM(load_key(self.dir, Path(key_file) if key_file else self.dir / KEY_FILE))

    def path(self, key: str) -> Path:
        """The file of ``key`` (a 64-character hex digest, see common.features.store_key)."""
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"a feature-cache key is 64 lowercase hex characters, got {key!r}")
        return self.dir / f"{key}{SUFFIX}"

    def load(self, key: str) -> PrefixOutput | None:
        """The output saved under ``key``; ``None`` (and a warning if a file was unreadable) otherwise."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 12 + 16:
                raise ValueError("not a fedpers feature file")
            nonce = blob[len(MAGIC) : len(MAGIC) + 12]
            plain = self._aead.decrypt(nonce, blob[len(MAGIC) + 12 :], MAGIC + key.encode())
            with np.load(io.BytesIO(plain), allow_pickle=False) as npz:
                tokens, mask, order = npz["tokens"], npz["mask"], npz["order"]
            keep = torch.from_numpy(mask.astype(bool))
            if tokens.shape[0] != int(keep.sum()):
                raise ValueError(f"{tokens.shape[0]} token states for {int(keep.sum())} tokens")
            hidden = torch.zeros(*mask.shape, tokens.shape[1], dtype=torch.float32)
            hidden[keep] = torch.from_numpy(tokens)
        except (InvalidTag, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            reason = "failed authentication" if isinstance(exc, InvalidTag) else str(exc)
            log.warning("feature cache %s unreadable (%s); recomputing it", path, reason)
            return None
        os.utime(path)  # most recently used
        return hidden, torch.from_numpy(mask.astype(np.int64)), order.astype(np.int64)

    def save(self, key: str, output: PrefixOutput) -> None:
        """Encrypt and write ``output`` under ``key`` atomically, then drop the least recently used files."""
        hidden, mask, order = output
        buf = io.BytesIO()
        np.savez(
            buf,
            tokens=hidden[mask.bool()].float().numpy(),
            mask=mask.numpy().astype(np.int8),
            order=np.asarray(order, dtype=np.int64),
        )
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, buf.getvalue(), MAGIC + key.encode())
        write_bytes_atomic(self.path(key), MAGIC + nonce + sealed)
        self._evict()

    def files(self) -> list[Path]:
        """The cache's files, least recently used first."""
        found = []
        for p in self.dir.glob(f"*{SUFFIX}"):
            try:
                found.append((p.stat().st_mtime_ns, p))
            except FileNotFoundError:  # removed by another process meanwhile
                continue
        return [p for _, p in sorted(found)]

    def _evict(self) -> None:
        for p in self.files()[: -self.max_files]:
            p.unlink(missing_ok=True)
