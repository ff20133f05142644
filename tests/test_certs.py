"""TLS material: a CA and a server certificate with the right SANs, keys 0600, a handshake on loopback."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from cli.main import app
from server.certs import CertError, create_tls


def test_certificates_chain_sans_and_key_modes(tmp_path: Path) -> None:
    files = create_tls(tmp_path, ["localhost", "127.0.0.1", "superlink.example.org"])
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_existing_keys_are_kept_unless_forced_and_bad_hosts_fail(tmp_path: Path) -> None:
    first = create_tls(tmp_path, ["localhost"])
    before = first.ca_key.read_bytes()
    with pytest.raises(CertError, match="already exist.*--force"):
        create_tls(tmp_path, ["localhost"])
    assert first.ca_key.read_bytes() == before
    assert create_tls(tmp_path, ["localhost"], force=True).ca_key.read_bytes() != before
    with pytest.raises(CertError, match="neither an IP address nor a valid DNS name"):
        create_tls(tmp_path / "x", ["bad host!"])
    with pytest.raises(CertError, match="at least one host"):
        create_tls(tmp_path / "y", [])


def test_tls_handshake_on_loopback_verifies_only_with_the_ca(tmp_path: Path) -> None:
    files = create_tls(tmp_path, ["localhost", "127.0.0.1"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    good = ssl.create_default_context(cafile=str(files.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        good.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(2) == b"ok"
    untrusted = ssl.create_default_context()  # system CAs only: our private CA is not among them
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        untrusted.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(timeout=5)
    listener.close()


def test_cli_certs(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["certs", "--out", str(tmp_path), "--host", "localhost", "--host", "127.0.0.1"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "server.pem").is_file() and "--ssl-certfile" in res.output
    again = CliRunner().invoke(app, ["certs", "--out", str(tmp_path), "--host", "localhost"])
    assert again.exit_code == 2 and "--force" in again.output
