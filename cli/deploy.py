"""Deployment: ``certs`` and ``server`` (the operator's side), ``node-key`` and ``agent`` (a device's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cli.options import split_csv
from cli.output import console, fail
from common.errors import FedpersError


def certs(
    out: Path = typer.Option(Path("certs"), help="folder for ca.crt, ca.key, server.pem, server.key"),
    host: list[str] = typer.Option(None, "--host", help="DNS name or IP clients dial (repeat); first = CN"),
    days: int = typer.Option(365, help="validity in days"),
    force: bool = typer.Option(
        False, help="replace existing keys (deployed clients must get the new ca.crt)"
    ),
) -> None:
    """Create a private CA and a SuperLink server certificate (keys 0600) for TLS."""
    from server.certs import create_tls

    try:
        files = create_tls(out, host or [], days, force)
    except FedpersError as exc:
        fail(exc)
    console.print(f"[green]✓[/] CA {files.ca_cert} (key {files.ca_key}, 0600)")
    console.print(
        f"[green]✓[/] server {files.server_cert} (key {files.server_key}, 0600) for {', '.join(host)}"
    )
    flags = f"--ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.server_cert} "
    flags += f"--ssl-keyfile {files.server_key}"
    console.print(f"SuperLink: flower-superlink {flags}; clients need only {files.ca_cert}")


def node_key(
    out: Path = typer.Option(Path("keys"), help="folder for <name>.key (0600) and <name>.pub"),
    name: str = typer.Option("node", help="file name stem"),
    force: bool = typer.Option(False, help="replace an existing key (the new public key must be registered)"),
) -> None:
    """Create this device's SuperNode identity (EC P-384, OpenSSH) for Flower's node authentication."""
    from client.node_key import create_node_key

    try:
        keys = create_node_key(out, name, force)
    except FedpersError as exc:
        fail(exc)
    console.print(f"[green]✓[/] private {keys.private} (0600; flower-supernode --auth-supernode-private-key)")
    console.print(f"[green]✓[/] public {keys.public} (operator: flwr supernode register {keys.public})")


def _start(plan: Any, run: Any, check: bool) -> None:
    """Plan a launch (one error line if it cannot be), show what was checked, then run it unless ``check``."""
    try:
        launch = plan()
    except FedpersError as exc:
        fail(exc)
    for line in launch.checks:
        console.print(f"[green]✓[/] {line}")
    if check:
        console.print(" ".join(launch.argv), soft_wrap=True, markup=False)
        if getattr(launch, "gateway", None):
            console.print(" ".join(launch.gateway), soft_wrap=True, markup=False)
        return
    raise typer.Exit(run(launch))


def agent(
    superlink: str = typer.Option(..., help="the SuperLink's HOST:PORT"),
    state_dir: Path = typer.Option(..., help="this device's folder for the encrypted personal state"),
    root_certificates: Path = typer.Option(None, help="CA certificate (ca.crt from `fedpers certs`)"),
    node_key: Path = typer.Option(None, help="this device's private key (`fedpers node-key`, 0600)"),
    data: Path = typer.Option(
        None, help="this user's CSV/JSONL (text,label[,user]; or free text, see --text)"
    ),
    labels: str = typer.Option("", help="comma-separated label names: check --data before connecting"),
    text: bool = typer.Option(
        False, "--text", help="--data is free text (text,user[,prompt]; task.dataset=text-file): check it"
    ),
    key_file: Path = typer.Option(
        None, help="state key file (default <state-dir>/state.key or $FEDPERS_STATE_KEY)"
    ),
    partition_id: int = typer.Option(0, help="which client of a shared data set this device plays"),
    num_partitions: int = typer.Option(1, help="clients the shared data set is split into"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    max_physical_batch: int = typer.Option(
        0, help="memory cap: examples per forward/backward pass (0 = whole batch; privacy unchanged)"
    ),
    feature_cache: bool = typer.Option(
        True, help="keep the frozen prefix's output in <state-dir>/features, encrypted (skips it next run)"
    ),
    port: int = typer.Option(0, help="local port of the SuperNode's ClientApp API (0 = a free one)"),
    max_retries: int = typer.Option(
        None,
        help="connection attempts of the SuperNode before it exits and the agent restarts it (default 10)",
    ),
    activation_timeout: float = typer.Option(
        180.0,
        help="keep retrying a refused activation this long from the first refusal (a restart after a crash "
        "waits ~60 s); an unreachable SuperLink is retried forever",
    ),
    insecure: bool = typer.Option(False, help="plain HTTP, no TLS (tests on a trusted network only)"),
    max_epsilon: float = typer.Option(
        8.0, help="this device's privacy cap: the most ε any run may spend here, over all runs"
    ),
    delta: float = typer.Option(
        0.0, help="this device's δ (0 = min(1e-5, 0.1/n) for n training examples); larger asks are refused"
    ),
    allow_no_dp: bool = typer.Option(False, help="accept runs that ask to train without DP"),
    check: bool = typer.Option(False, help="check everything and print the SuperNode command, start nothing"),
) -> None:
    """Run this device's client agent: a Flower SuperNode with the fedpers ClientApp (TLS, node auth)."""
    from client.agent import AgentOptions, plan_agent, run_agent

    opts = AgentOptions(
        superlink=superlink,
        state_dir=state_dir,
        root_certificates=root_certificates,
        insecure=insecure,
        node_key=node_key,
        data=data,
        labels=tuple(split_csv(labels)),
        free_text=text,
        key_file=key_file,
        partition_id=partition_id,
        num_partitions=num_partitions,
        device=device,
        max_physical_batch=max_physical_batch,
        feature_cache=feature_cache,
        clientappio_port=port,
        max_retries=max_retries,
        max_epsilon=max_epsilon,
        delta=delta,
        allow_no_dp=allow_no_dp,
    )
    _start(lambda: plan_agent(opts), lambda launch: run_agent(launch, activation_timeout), check)


def server(
    address: str = typer.Option(
        "0.0.0.0:9092", help="HOST:PORT devices dial: the gateway, which serves the Fleet API only"
    ),
    control_address: str = typer.Option(
        "127.0.0.1:9093", help="loopback HOST:PORT of the SuperLink itself (Control API: the operator's flwr)"
    ),
    certs_dir: Path = typer.Option(
        None, "--certs", help="folder from `fedpers certs` (ca.crt, server.pem, ...)"
    ),
    public_host: str = typer.Option(
        "", help="the name clients dial (must be in the certificate; default: host)"
    ),
    database: Path = typer.Option(
        Path("~/.fedpers/server/superlink.db"), help="SuperLink state (registered nodes, runs)"
    ),
    flwr_home: Path = typer.Option(
        Path("~/.fedpers/server/flwr"), help="operator's Flower home (connection config)"
    ),
    connection: str = typer.Option("fedpers", help="name of the connection for `flwr run . NAME`"),
    node_auth: bool = typer.Option(True, help="only registered node keys may join"),
    insecure: bool = typer.Option(False, help="plain HTTP, no TLS (tests on a trusted network only)"),
    check: bool = typer.Option(False, help="check everything and print the SuperLink command, start nothing"),
) -> None:
    """Start a Flower SuperLink with TLS and node authentication for fedpers clients."""
    from server.link import LinkOptions, plan_link, run_link

    opts = LinkOptions(
        address=address,
        certs=certs_dir,
        database=database.expanduser(),
        flwr_home=flwr_home.expanduser(),
        connection=connection,
        public_host=public_host,
        node_auth=node_auth,
        insecure=insecure,
        control_address=control_address,
    )
    _start(lambda: plan_link(opts), run_link, check)


def register(app: typer.Typer) -> None:
    """Add ``certs``, ``node-key``, ``agent`` and ``server`` to ``app``, in that order."""
    app.command()(certs)
    app.command("node-key")(node_key)
    app.command()(agent)
    app.command()(server)
