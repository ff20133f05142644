"""The client agent: a Flower SuperNode running the fedpers ClientApp on a user's device.

``fedpers agent`` checks everything it can before it dials out (the CA file, the node key and its mode,
the state folder, the data file, the device), then starts ``flower-supernode`` with TLS (never plain
HTTP unless ``--insecure`` is given), node authentication, and a node configuration that tells the
ClientApp where this user's data, encrypted state, state key and device are. Each agent gets its own
Flower home inside the state folder: Flower unpacks the app there for every task, and two SuperNodes
sharing one home race on that unpacking.

The SuperNode reconnects after network errors; its ClientApp runs each instruction in a fresh process
(Flower 1.41's ``subprocess`` isolation), so a crash mid-round loses nothing that was saved: the personal
state is written atomically after training, before the reply is sent.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import validate_device_limits
from common.errors import ConfigError, DataError, FedpersError
from common.launch import check_address, find_tool, free_port, run_foreground

# Flower exits with status 1 for every error; these lines of its output say which one it was.
ACTIVATION_FAILED = "Failed to activate SuperNode"
NOT_REGISTERED = "All SuperNodes must be registered"
CERT_FAILED = "CERTIFICATE_VERIFY_FAILED"
WATCHED = (ACTIVATION_FAILED, NOT_REGISTERED, CERT_FAILED)
SUPERNODE_RETRIES = 10  # connection attempts (with Flower's backoff) before the SuperNode exits


class AgentError(FedpersError):
    """The agent cannot start as configured."""


@dataclass(frozen=True)
class AgentOptions:
    """What ``fedpers agent`` was asked to do."""

    superlink: str
    state_dir: Path
    root_certificates: Path | None = None
    insecure: bool = False
    node_key: Path | None = None
    data: Path | None = None
    labels: tuple[str, ...] = ()
    free_text: bool = False  # --data is free text for the generative assistant (text, user[, prompt])
    key_file: Path | None = None
    partition_id: int = 0
    num_partitions: int = 1
    device: str = "auto"
    max_physical_batch: int = 0  # examples per forward/backward pass (0 = whole batch): the memory cap
    feature_cache: bool = True  # keep the frozen prefix's output in <state-dir>/features (encrypted)
    clientappio_port: int = 0  # 0 = a free port on 127.0.0.1
    max_retries: int | None = None
    max_epsilon: float = 8.0  # this device's ε cap over all runs; a run asking for more is refused
    delta: float = 0.0  # this device's δ (0 = min(1e-5, 0.1/n)); a run asking for a larger δ is refused
    allow_no_dp: bool = False  # accept runs with dp.enabled = false


@dataclass(frozen=True)
class AgentLaunch:
    """The command line and environment of the SuperNode, and what was checked."""

    argv: list[str]
    env: dict[str, str]
    checks: list[str]
    superlink: str = ""
    insecure: bool = False


def _private_file(path: Path, what: str) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise AgentError(f"{what} {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise AgentError(f"{what} {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    return path.resolve()


def _node_config(values: dict[str, object]) -> str:
    """Flower's ``--node-config`` string: space-separated key=value with TOML values."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, str):
            parts.append(f"{key}={json.dumps(value)}")  # a JSON string is a valid TOML basic string
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _check_data(opts: AgentOptions) -> str | None:
    if opts.data is None:
        return None
    path = opts.data.expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (--data)")
    if opts.free_text and opts.labels:
        raise ConfigError("--text (free text for the generative assistant) takes no --labels")
    if opts.free_text:
        from common.datafile import read_text_file

        lines, owners, prompts = read_text_file(path)
        turns = "with prompts (chat turns)" if prompts is not None else "no prompt column"
        return f"data {path}: {len(lines)} texts, {len(set(owners))} user(s), {turns}"
    if opts.labels:
        from common.datafile import read_file

        texts, _, users = read_file(path, opts.labels)
        who = f"{len(set(users))} user(s)" if users else "no user column"
        return f"data {path}: {len(texts)} examples, {who}, labels {', '.join(opts.labels)}"
    return f"data {path} (labels not given: checked on the first round)"


def plan_agent(opts: AgentOptions, flower_supernode: str | None = None) -> AgentLaunch:
    """Validate ``opts`` and build the ``flower-supernode`` command; raises with one clear message."""
    from common.device import describe, resolve_device

    check_address(opts.superlink)
    if opts.num_partitions < 1 or not 0 <= opts.partition_id < opts.num_partitions:
        raise ConfigError(
            f"--partition-id {opts.partition_id} must be in [0, --num-partitions {opts.num_partitions})"
        )
    checks = []
    exe = flower_supernode or find_tool("flower-supernode")
    if not exe:
        raise AgentError("flower-supernode is not on PATH: install fedpers (pip install -e .) in this env")
    argv = [exe, "--superlink", opts.superlink]
    if opts.insecure:
        if opts.root_certificates:
            raise ConfigError("--insecure and --root-certificates exclude each other")
        argv.append("--insecure")
        checks.append("transport: PLAIN HTTP (--insecure): only for a test SuperLink on a trusted network")
    else:
        if opts.root_certificates is None:
            raise ConfigError(
                "--root-certificates CA.crt is required (the CA that signed the SuperLink's certificate, "
                "from `fedpers certs`); --insecure disables TLS for tests only"
            )
        ca = opts.root_certificates.expanduser()
        if not ca.is_file():
            raise AgentError(f"CA certificate {ca} does not exist (--root-certificates)")
        argv += ["--root-certificates", str(ca.resolve())]
        checks.append(f"transport: TLS, server verified against {ca}")
    if opts.node_key is not None:
        key = _private_file(opts.node_key, "node key")
        argv += ["--auth-supernode-private-key", str(key)]
        checks.append(f"identity: {key} (its .pub must be registered on the SuperLink)")
    else:
        checks.append("identity: none (only works with a SuperLink without --enable-supernode-auth)")
    state = opts.state_dir.expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    device = resolve_device(opts.device)
    checks.append(f"device: {describe(device)}")
    data = _check_data(opts)
    if data:
        checks.append(data)
    node_config: dict[str, object] = {
        "partition-id": opts.partition_id,
        "num-partitions": opts.num_partitions,
        "state-dir": str(state),
        "device": str(device),
        "max-physical-batch": opts.max_physical_batch,
    }
    if opts.max_physical_batch < 0:
        raise ConfigError("--max-physical-batch must be >= 0 (0 = the whole logical batch)")
    limits = {"max-epsilon": opts.max_epsilon, "delta": opts.delta, "allow-no-dp": opts.allow_no_dp}
    node_config.update(validate_device_limits(limits, lambda key: f"--{key}"))
    delta = f"δ = {opts.delta:g}" if opts.delta else "δ = min(1e-5, 0.1/n) for n training examples"
    checks.append(
        f"privacy: this device spends at most ε = {opts.max_epsilon:g} over all runs, at {delta}; "
        + ("runs without DP accepted (--allow-no-dp)" if opts.allow_no_dp else "runs without DP refused")
    )
    if opts.max_physical_batch:
        checks.append(f"memory: at most {opts.max_physical_batch} examples per forward/backward pass")
    if opts.feature_cache:
        node_config["feature-cache"] = str(state / "features")
        checks.append(f"feature cache: {state / 'features'} (encrypted; off with --no-feature-cache)")
    if opts.data is not None:
        node_config["data-path"] = str(opts.data.expanduser().resolve())
    if opts.key_file is not None:
        node_config["key-file"] = str(opts.key_file.expanduser().resolve())
    checks.append(f"state: {state} (encrypted; key {opts.key_file or '$FEDPERS_STATE_KEY or state.key'})")
    port = opts.clientappio_port or free_port()
    argv += ["--node-config", _node_config(node_config), "--port", str(port)]
    # the SuperNode gives up after its retries; the agent decides whether to start it again
    argv += ["--max-retries", str(SUPERNODE_RETRIES if opts.max_retries is None else opts.max_retries)]
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(state / "flwr"),
            # flower-supernode starts flower-superexec and flwr-clientapp by name: same env as itself
            "PATH": os.pathsep.join([str(Path(exe).parent), os.environ.get("PATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )
    return AgentLaunch(argv, env, checks, opts.superlink, opts.insecure)


def run_agent(
    launch: AgentLaunch,
    activation_timeout: float = 180.0,
    retry_every: float = 10.0,
    max_backoff: float = 300.0,
    healthy_after: float = 30.0,
) -> int:
    """Run the SuperNode in the foreground and keep it running, forever; its last exit code.

    The agent is the device's supervisor. A SuperNode that exits with an error is started again, first
    after ``retry_every`` seconds, then with the wait doubling up to ``max_backoff`` while failures
    follow each other (refused activations are retried every ``retry_every`` seconds); an unreachable
    SuperLink (network down, server restarting) is retried forever.
    The agent gives up only on what cannot heal by waiting:

    - a refused activation that persists for ``activation_timeout`` seconds, counted from the first
      failure of the streak (an unregistered key; a restart right after a crash is refused too, for
      about a minute, while the SuperLink still holds the old session);
    - a key-less node at a SuperLink that admits registered keys only;
    - TLS that cannot work: the CA does not vouch for the SuperLink's certificate, or ``--insecure``
      dials a SuperLink that speaks TLS (found by a probe of the address after a connection failure).

    A SuperNode that ran for longer than ``healthy_after`` seconds before it failed starts a new streak.
    SIGINT/SIGTERM stop the SuperNode and the agent; a clean exit (0) is not restarted.
    """
    failing_since: float | None = None
    wait = retry_every
    while True:
        started = time.monotonic()
        result = run_foreground(launch.argv, launch.env, watch=WATCHED)
        now = time.monotonic()
        if result.stopped or result.code == 0:
            return result.code
        if failing_since is None or now - started > healthy_after:
            failing_since, wait = now, retry_every  # a crash after a healthy stretch: a new streak
        cause = _cause(result.seen, launch)
        if cause.fatal or (cause.expires and now - failing_since > activation_timeout):
            print(f"fedpers agent: SuperNode exited with code {result.code}: {cause.hint}", file=sys.stderr)
            return result.code or 1
        pause = retry_every if cause.expires else wait  # a refused activation clears within a minute
        print(
            f"fedpers agent: SuperNode exited with code {result.code} ({cause.hint}); starting it again in "
            f"{pause:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(pause)
        if not cause.expires:
            wait = min(wait * 2, max_backoff)


@dataclass(frozen=True)
class Cause:
    """Why the SuperNode failed: a hint that names it, whether waiting can help."""

    hint: str
    fatal: bool = False  # waiting cannot help: give up now
    expires: bool = False  # may heal, but only within the activation timeout


def _cause(seen: frozenset[str], launch: AgentLaunch) -> Cause:
    """Classify a failed SuperNode from its output (and, for a failed connection, a probe of the link)."""
    if NOT_REGISTERED in seen:
        return Cause(
            "the SuperLink admits registered node keys only and this agent has none: create one with "
            "`fedpers node-key`, have the operator run `flwr supernode register node.pub`, then pass "
            "--node-key",
            fatal=True,
        )
    if ACTIVATION_FAILED in seen:
        return Cause(
            "the SuperLink did not activate this node: its key is not registered (`flwr supernode "
            "register node.pub`), or its previous session is still marked online after a restart",
            expires=True,
        )
    if CERT_FAILED in seen:
        return Cause(
            "TLS verification failed: the CA certificate (--root-certificates) did not sign the "
            "SuperLink's certificate, or the certificate does not name the address dialled",
            fatal=True,
        )
    probe = probe_link(launch.superlink, launch.insecure)
    if probe:
        return Cause(probe, fatal=True)
    return Cause("the SuperLink could not be reached (network or server down?); retrying")


def probe_link(address: str, insecure: bool, timeout: float = 5.0) -> str | None:
    """A reason that waiting cannot fix, found by dialling ``address``; None if it may heal."""
    host, port = check_address(address)
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as sock:
            if not insecure:
                return None
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            try:
                with ctx.wrap_socket(sock, server_hostname=host):
                    return (
                        f"--insecure dials {address} in plain HTTP, but the SuperLink speaks TLS: drop "
                        "--insecure and pass --root-certificates ca.crt"
                    )
            except (ssl.SSLError, OSError):
                return None
    except OSError:
        return None
