"""The SuperNode's identity for Flower's node authentication: an EC P-384 key pair in OpenSSH format.

The private key (``node.key``, 0600) stays on the device and is passed to ``flower-supernode
--auth-supernode-private-key``; the public key (``node.pub``) is what the federation operator registers
(``flwr supernode register node.pub``) so that only known devices can join a SuperLink started with
``--enable-supernode-auth``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import FedpersError


class NodeKeyError(FedpersError):
    """A node key cannot be created as asked."""


@dataclass(frozen=True)
class NodeKey:
    """Paths of a node's key pair."""

    private: Path
    public: Path


def create_node_key(out: str | Path, name: str = "node", force: bool = False) -> NodeKey:
    """Create ``<name>.key`` (0600) and ``<name>.pub`` in ``out``; never overwrite unless ``force``."""
    if not name or "/" in name or name.startswith("."):
        raise NodeKeyError(f"key name {name!r} must be a plain file name")
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    keys = NodeKey(folder / f"{name}.key", folder / f"{name}.pub")
    if keys.private.exists() and not force:
        raise NodeKeyError(
            f"{keys.private} already exists (a registered identity); pass --force to replace it and "
            "register the new public key"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(keys.private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    os.chmod(keys.private, 0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys.public.write_bytes(public + f" fedpers-{name}\n".encode())
    return keys
