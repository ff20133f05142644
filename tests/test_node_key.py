"""Node identities load with the exact loaders Flower's SuperNode and `flwr supernode register` use."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from cli.main import app
from client.node_key import NodeKeyError, create_node_key


def test_key_pair_is_flower_compatible_and_private(tmp_path: Path) -> None:
    keys = create_node_key(tmp_path)
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600
    private = load_ssh_private_key(keys.private.read_bytes(), None)
    public = load_ssh_public_key(keys.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert (
        public.curve.name == "secp384r1" and private.public_key().public_numbers() == public.public_numbers()
    )


def test_existing_identity_is_kept_and_names_are_checked(tmp_path: Path) -> None:
    first = create_node_key(tmp_path, "edge-1").private.read_bytes()
    with pytest.raises(NodeKeyError, match="--force"):
        create_node_key(tmp_path, "edge-1")
    assert create_node_key(tmp_path, "edge-1", force=True).private.read_bytes() != first
    with pytest.raises(NodeKeyError, match="plain file name"):
        create_node_key(tmp_path, "../x")
    res = CliRunner().invoke(app, ["node-key", "--out", str(tmp_path / "k")])
    assert res.exit_code == 0 and (tmp_path / "k" / "node.pub").is_file(), res.output
