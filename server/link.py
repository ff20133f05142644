"""The server side of a deployment: a Flower SuperLink with TLS and node authentication, behind a gateway.

``fedpers server`` checks the certificate files from ``fedpers certs`` (that the server certificate was
signed by the CA and names both the host devices dial and 127.0.0.1, which the SuperLink's own SuperExec
dials), writes the operator's Flower connection (so that ``flwr supernode register`` and ``flwr run``
talk TLS to this SuperLink on loopback), and starts two processes:

- ``flower-superlink`` on the loopback control address only, with a persistent database (0600),
  ``--enable-supernode-auth`` (only registered public keys may join) and runtime dependency installation
  off. Its Control API (register keys, submit runs) is thus reachable only from this machine (remotely:
  through ``ssh -L``, i.e. with the operator's SSH credentials).
- the gateway (``server.gateway``) on the public address, which serves the Fleet API and nothing else.

The ServerApp (``flwr run . <connection>``) writes its checkpoints and ledger into ``output.run-dir`` and
resumes from them after a restart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import threading
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

    address: str  # HOST:PORT devices dial: the gateway (Fleet API only)
    certs: Path | None  # folder from `fedpers certs` (ca.crt, server.pem, server.key)
    database: Path
    flwr_home: Path
    connection: str = "fedpers"
    public_host: str = ""  # the name clients and `flwr` dial ("" = the listening host)
    node_auth: bool = True
    insecure: bool = False
    control_address: str = "127.0.0.1:9093"  # the SuperLink itself (all its APIs): loopback only


@dataclass(frozen=True)
class LinkLaunch:
    """The command lines and environment of the SuperLink and of its Fleet gateway."""

    argv: list[str]
    env: dict[str, str]
    config_file: Path
    checks: list[str]
    gateway: list[str] = dataclasses.field(default_factory=list)


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
    for needed, who in ((host, "devices"), ("127.0.0.1", "the SuperLink's own SuperExec")):
        if needed not in names:
            raise LinkError(
                f"{cert} is not valid for {needed!r}, which {who} dial (it names "
                f"{', '.join(sorted(names))}): recreate it with `fedpers certs --force --host {host}`"
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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def plan_link(opts: LinkOptions, flower_superlink: str | None = None) -> LinkLaunch:
    """Validate ``opts`` and build the ``flower-superlink`` and gateway commands."""
    host, port = check_address(opts.address)
    ctl_host, ctl_port = check_address(opts.control_address)
    if not _loopback(ctl_host):
        raise ConfigError(
            f"--control-address {opts.control_address} must be a loopback address: the Control API has no "
            "authentication of its own; operators elsewhere reach it with `ssh -L "
            f"{ctl_port}:127.0.0.1:{ctl_port} <server>`"
        )
    if (host, port) == (ctl_host, ctl_port):
        raise ConfigError(f"--address and --control-address must differ (both {opts.address})")
    public = opts.public_host or host
    exe = flower_superlink or find_tool("flower-superlink")
    if not exe:
        raise LinkError("flower-superlink is not on PATH: install fedpers (pip install -e .) in this env")
    checks = []
    argv = [exe, "--host", ctl_host, "--port", str(ctl_port), "--disable-runtime-dependency-installation"]
    gateway = [sys.executable, "-m", "server.gateway", "--listen", opts.address, "--upstream"]
    gateway.append(opts.control_address)
    ca = None
    if opts.insecure:
        if opts.certs is not None:
            raise ConfigError("--insecure and --certs exclude each other")
        argv.append("--insecure")
        gateway.append("--insecure")
        checks.append("transport: PLAIN HTTP (--insecure): only for tests on a trusted network")
    else:
        if opts.certs is None:
            raise ConfigError(
                "--certs FOLDER is required (from `fedpers certs`); --insecure is for tests only"
            )
        ca, cert, key = check_certs(opts.certs.expanduser(), public)
        argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        gateway += ["--certs", str(opts.certs.expanduser().resolve())]
        checks.append(f"transport: TLS with {cert} (valid for {public} and 127.0.0.1, signed by {ca})")
    checks.append(f"devices: Fleet API only, on {opts.address} (the gateway; everything else is refused)")
    checks.append(f"operator: Control API on {opts.control_address} only (loopback)")
    if opts.node_auth:
        argv.append("--enable-supernode-auth")
        checks.append(
            f"node auth: on (register each device: flwr supernode register node.pub {opts.connection})"
        )
    else:
        checks.append("node auth: OFF (any node that reaches the port may join)")
    _private_dir(opts.database.parent)
    argv += ["--database", str(opts.database)]
    checks.append(f"state: {opts.database} (0600; registered nodes and runs survive a restart)")
    config = write_connection(
        _private_dir(opts.flwr_home), opts.connection, opts.control_address, ca.resolve() if ca else None
    )
    checks.append(f"operator: FLWR_HOME={opts.flwr_home} flwr run . {opts.connection}")
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(opts.flwr_home), "HF_HUB_OFFLINE": "1"})
    # flower-superlink starts flower-superexec and flwr-serverapp by name: same env as itself
    env["PATH"] = os.pathsep.join([str(Path(exe).parent), os.environ.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return LinkLaunch(argv, env, config, checks, gateway)


def run_link(launch: LinkLaunch) -> int:
    """Run the SuperLink in the foreground, its gateway beside it, until either exits; the exit code.

    Files the SuperLink creates (its database and journal) are private to the operator (umask 077).
    SIGINT/SIGTERM stop both.
    """
    old = os.umask(0o077)
    try:
        gateway = subprocess.Popen(launch.gateway, env=launch.env) if launch.gateway else None
        lost = threading.Event()

        def watch() -> None:  # a SuperLink that devices cannot reach is of no use: stop it too
            if gateway is not None and gateway.wait() != 0 and not stopping.is_set():
                print("fedpers server: the Fleet gateway exited; stopping the SuperLink", file=sys.stderr)
                lost.set()
                os.kill(os.getpid(), signal.SIGTERM)

        stopping = threading.Event()
        threading.Thread(target=watch, daemon=True).start()
        try:
            code = run_foreground(launch.argv, launch.env).code
            return 1 if lost.is_set() else code
        finally:
            stopping.set()
            if gateway is not None and gateway.poll() is None:
                gateway.terminate()
                try:
                    gateway.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    gateway.kill()
    finally:
        os.umask(old)
