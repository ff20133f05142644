"""The client's personal state on disk, encrypted at rest with AES-GCM.

One file, ``personal.state``, holds everything the client keeps between rounds and runs: its personal
tensors (the head, and whatever else the mode keeps local), the accountant history, counters and the
current run's noise plan. Disk is the truth: Flower's ``context.state`` is lost when a node restarts.

File layout: ``MAGIC | nonce (12 bytes) | AES-GCM(ciphertext + tag)``, the associated data binds the
magic. The plaintext is ``len(json) (8 bytes) | json header | npz tensors``. A tampered, truncated or
wrongly keyed file raises :class:`StateError`; it is never silently replaced, so the privacy history
cannot be reset by damaging the file. Writes are atomic: temp file, fsync, rename, fsync of the folder.

The key (32 bytes) comes from ``$FEDPERS_STATE_KEY`` (64 hex characters) or a key file, created with
mode 0600 on first use (default ``<state dir>/state.key``; point ``key_file`` elsewhere, e.g. to a
hardware-backed mount, for real protection against a stolen disk).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import struct
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import StateError
from common.privacy import History, normalize

MAGIC = b"FEDPERS-STATE-1\n"
KEY_ENV = "FEDPERS_STATE_KEY"
STATE_FILE = "personal.state"


@dataclasses.dataclass
class PersonalState:
    """What a client keeps on its device."""

    tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    history: History = dataclasses.field(default_factory=list)
    rounds_trained: int = 0
    examples_seen: int = 0
    run_plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    shared: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # latest global (for predict)
    examples: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # own turns, for chat context


def load_key(state_dir: Path, key_file: Path | None) -> bytes:
    """The 32-byte key: ``$FEDPERS_STATE_KEY``, else ``key_file`` (default ``<state_dir>/state.key``)."""
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            key = bytes.fromhex(env.strip())
        except ValueError as exc:
            raise StateError(f"${KEY_ENV} must be 64 hex characters (a 32-byte key)") from exc
        if len(key) != 32:
            raise StateError(f"${KEY_ENV} must be 64 hex characters (a 32-byte key), got {len(key)} bytes")
        return key
    path = key_file or state_dir / "state.key"
    if path.exists():
        data = path.read_bytes()
        if len(data) != 32:
            raise StateError(f"key file {path} is {len(data)} bytes, expected 32; restore the original key")
        return data
    if (state_dir / STATE_FILE).exists():
        raise StateError(
            f"{state_dir / STATE_FILE} exists but its key file {path} is missing; restore the key "
            f"(or set ${KEY_ENV}). The state is not reset automatically: it holds the privacy history."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


class StateStore:
    """Load and save one client's :class:`PersonalState` in ``state_dir``."""

    def __init__(self, state_dir: str | Path, key_file: str | Path | None = None) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_FILE
        self._aead = AESGCM(load_key(self.dir, Path(key_file) if key_file else None))

    def exists(self) -> bool:
        """Whether a state file is present."""
        return self.path.exists()

    def load(self, *, reading: bool = False) -> PersonalState | None:
        """The saved state, ``None`` if there is none yet; StateError if it is damaged or the key is wrong.

        ``reading``: the caller only reads the state (predict, chat, generate), so the error says what the
        user must fix (the key) rather than that training is refused.
        """
        if not self.path.exists():
            return None
        blob = self.path.read_bytes()
        if len(blob) < len(MAGIC) + 12 + 16 or not blob.startswith(MAGIC):
            then = "" if reading else "; refusing to train"
            raise StateError(f"{self.path} is truncated or not a fedpers state file{then}")
        nonce = blob[len(MAGIC) : len(MAGIC) + 12]
        try:
            plain = self._aead.decrypt(nonce, blob[len(MAGIC) + 12 :], MAGIC)
        except InvalidTag as exc:
            raise StateError(self._unopened(reading)) from exc
        (hlen,) = struct.unpack(">Q", plain[:8])
        header = json.loads(plain[8 : 8 + hlen])
        with np.load(io.BytesIO(plain[8 + hlen :]), allow_pickle=False) as npz:
            tensors = {name: npz[f"t{i}"] for i, name in enumerate(header["tensor_names"])}
            shared = {name: npz[f"s{i}"] for i, name in enumerate(header.get("shared_names", []))}
        return PersonalState(
            tensors=tensors,
            history=normalize(header["history"]),
            rounds_trained=int(header["rounds_trained"]),
            examples_seen=int(header["examples_seen"]),
            run_plan=dict(header["run_plan"]),
            meta=dict(header["meta"]),
            shared=shared,
            examples=[(str(c), str(r)) for c, r in header.get("examples", [])],
        )

    def _unopened(self, reading: bool) -> str:
        """Why the state did not decrypt: AES-GCM cannot tell a wrong key from an altered file."""
        if reading:
            return (
                f"the state key does not open {self.path} (wrong --key-file or ${KEY_ENV}), "
                "or the file was altered"
            )
        return f"{self.path} failed authentication (tampered, truncated or wrong key); refusing to train"

    def save(self, state: PersonalState) -> None:
        """Encrypt and write ``state`` atomically."""
        names = sorted(state.tensors)
        shared_names = sorted(state.shared)
        header = json.dumps(
            {
                "tensor_names": names,
                "shared_names": shared_names,
                "history": [list(e) for e in state.history],
                "rounds_trained": state.rounds_trained,
                "examples_seen": state.examples_seen,
                "run_plan": state.run_plan,
                "meta": state.meta,
                "examples": [list(e) for e in state.examples],
            }
        ).encode()
        buf = io.BytesIO()
        arrays = {f"t{i}": np.ascontiguousarray(state.tensors[n]) for i, n in enumerate(names)}
        arrays.update({f"s{i}": np.ascontiguousarray(state.shared[n]) for i, n in enumerate(shared_names)})
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        plain = struct.pack(">Q", len(header)) + header + buf.getvalue()
        nonce = secrets.token_bytes(12)
        blob = MAGIC + nonce + self._aead.encrypt(nonce, plain, MAGIC)
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
