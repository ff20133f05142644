"""The server side of a deployment: a Flower SuperLink with TLS and node authentication.

``fedpers server`` checks the certificate files from ``fedpers certs`` (that the server certificate was
signed by the CA and names the host clients dial), writes the operator's Flower connection (so that
``flwr supernode register`` and ``flwr run`` talk TLS to this SuperLink), and starts
``flower-superlink`` with a persistent database, ``--enable-supernode-auth`` (only registered public keys
may join) and runtime dependency installation off. The ServerApp (``flwr run . <connection>``) writes
its checkpoints and ledger into ``output.run-dir`` and resumes from them after a restart.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError, FedpersError
from common.launch import check_address, find_tool, run_foreground


class LinkError(FedpersError):
    """The SuperLink cannot start as configured."""


@dataclass(frozen=True)
class LinkOptions:
    """What ``fedpers server`` was asked to do."""

    address: str  # HOST:PORT the SuperLink listens on (all of its APIs, flwr 1.41)
    certs: Path | None  # folder from `fedpers certs` (ca.crt, server.pem, server.key)
    database: Path
    flwr_home: Path
    connection: str = "fedpers"
    public_host: str = ""  # the name clients and `flwr` dial ("" = the listening host)
    node_auth: bool = True
    insecure: bool = False


@dataclass(frozen=True)
class LinkLaunch:
    """The command line and environment of the SuperLink."""

    argv: list[str]
    env: dict[str, str]
    config_file: Path
    checks: list[str]


def check_certs(certs: Path, host: str) -> tuple[Path, Path, Path]:
    """(ca.crt, server.pem, server.key) after checking the chain and that ``host`` is in the SANs."""
    ca, cert, key = certs / "ca.crt", certs / "server.pem", certs / "server.key"
    for p in (ca, cert, key):
        if not p.is_file():
            raise LinkError(
                f"{p} does not exist: create the files with `fedpers certs --out {certs} --host ...`"
            )
    if os.name == "posix" and key.stat().st_mode & 0o077:
        raise LinkError(f"{key} is readable by others; run `chmod 600 {key}`")
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    server_cert = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise LinkError(f"{cert} was not signed by {ca}: {exc}") from exc
    public = ca_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise LinkError(f"{ca} is not an EC CA from `fedpers certs`")
    sans = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    names |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    if host not in names:
        raise LinkError(
            f"{cert} is not valid for {host!r} (it names {', '.join(sorted(names))}); clients would reject "
            f"it: recreate it with `fedpers certs --force --host {host}`"
        )
    return ca, cert, key


def write_connection(flwr_home: Path, name: str, address: str, ca: Path | None) -> Path:
    """Add (or replace) the ``[superlink.<name>]`` connection in ``<flwr_home>/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data: dict = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise LinkError(f"{path} is not valid TOML: {exc}") from exc
    links = data.setdefault("superlink", {})
    links.setdefault("default", name)
    links[name] = {"address": address, **({"root-certificates": str(ca)} if ca else {"insecure": True})}
    path.write_text(_toml(data), encoding="utf-8")
    return path


def _toml(data: dict) -> str:
    """A tiny TOML writer for the two levels of Flower's config file (strings, bools, numbers)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    for section, table in data.items():
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
        lines.append("")
        for sub, subtable in table.items():
            if isinstance(subtable, dict):
                lines.append(f"[{section}.{sub}]")
                lines += [f"{k} = {value(v)}" for k, v in subtable.items() if not isinstance(v, dict)]
                lines.append("")
    return "\n".join(lines)


def plan_link(opts: LinkOptions, flower_superlink: str | None = None) -> LinkLaunch:
    """Validate ``opts`` and build the ``flower-superlink`` command."""
    host, port = check_address(opts.address)
    public = opts.public_host or host
    exe = flower_superlink or find_tool("flower-superlink")
    if not exe:
        raise LinkError("flower-superlink is not on PATH: install fedpers (pip install -e .) in this env")
    checks = []
    argv = [exe, "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    ca = None
    if opts.insecure:
        if opts.certs is not None:
            raise ConfigError("--insecure and --certs exclude each other")
        argv.append("--insecure")
        checks.append("transport: PLAIN HTTP (--insecure): only for tests on a trusted network")
    else:
        if opts.certs is None:
            raise ConfigError(
                "--certs FOLDER is required (from `fedpers certs`); --insecure is for tests only"
            )
        ca, cert, key = check_certs(opts.certs.expanduser(), public)
        argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        checks.append(f"transport: TLS with {cert} (valid for {public}, signed by {ca})")
    if opts.node_auth:
        argv.append("--enable-supernode-auth")
        checks.append(
            f"node auth: on (register each device: flwr supernode register node.pub {opts.connection})"
        )
    else:
        checks.append("node auth: OFF (any node that reaches the port may join)")
    opts.database.parent.mkdir(parents=True, exist_ok=True)
    argv += ["--database", str(opts.database)]
    checks.append(f"state: {opts.database} (registered nodes and runs survive a restart)")
    config = write_connection(
        opts.flwr_home, opts.connection, f"{public}:{port}", ca.resolve() if ca else None
    )
    checks.append(f"operator: FLWR_HOME={opts.flwr_home} flwr run . {opts.connection}")
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(opts.flwr_home), "HF_HUB_OFFLINE": "1"})
    # flower-superlink starts flower-superexec and flwr-serverapp by name: same env as itself
    env["PATH"] = os.pathsep.join([str(Path(exe).parent), os.environ.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return LinkLaunch(argv, env, config, checks)


def run_link(launch: LinkLaunch) -> int:
    """Run the SuperLink in the foreground until it exits (SIGINT/SIGTERM stop it); its exit code."""
    return run_foreground(launch.argv, launch.env).code
