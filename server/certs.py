"""TLS material for a real SuperLink: a private CA and a server certificate with the right SANs.

Everything is generated locally with ``cryptography``: an EC P-384 CA (``ca.key`` 0600, ``ca.crt``) and a
server key and certificate signed by it (``server.key`` 0600, ``server.pem``) whose subject alternative
names list every DNS name and IP address clients will dial, plus ``127.0.0.1`` and ``localhost``: the
SuperLink's own SuperExec and the operator's ``flwr`` on the server dial it on loopback, and a
certificate without them leaves every run "pending" (the SuperExec fails verification and is not
restarted). Clients only need ``ca.crt``. Existing keys are never overwritten unless asked (a silently
replaced CA would lock every deployed client out).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FedpersError

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"^(?=.{{1,253}}$)(\*\.)?{_LABEL}(\.{_LABEL})*$")
LOOPBACK = ("127.0.0.1", "localhost")  # what the SuperLink's own SuperExec and the operator dial


class CertError(FedpersError):
    """Certificates cannot be created as asked."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the generated files (the flags ``flower-superlink`` and ``flower-supernode`` take)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS.match(host):
                raise CertError(f"{host!r} is neither an IP address nor a valid DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # also when the file existed with wider permissions


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    days: int,
    ca: bool,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(_san(hosts), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA384())


def create_tls(out: str | Path, hosts: Sequence[str], days: int = 365, force: bool = False) -> TlsFiles:
    """Create (or, with ``force``, replace) a CA and a server certificate for ``hosts`` in ``out``."""
    if not hosts:
        raise CertError("give at least one host name or IP address the clients will connect to")
    if days < 1:
        raise CertError(f"days must be at least 1, got {days}")
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.crt", folder / "ca.key", folder / "server.pem", folder / "server.key")
    existing = [p.name for p in (files.ca_key, files.server_key) if p.exists()]
    if existing and not force:
        raise CertError(f"{', '.join(existing)} already exist in {folder}; pass --force to replace them")
    hosts = [*hosts, *(h for h in LOOPBACK if h not in hosts)]
    _san(hosts)  # validate before writing anything
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _cert("fedpers CA", ca_key, None, ca_key, days, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _cert(hosts[0], server_key, ca_cert.subject, ca_key, days, ca=False, hosts=hosts)
    _write_key(files.ca_key, ca_key)
    _write_key(files.server_key, server_key)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return files
