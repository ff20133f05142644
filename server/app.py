"""The Flower ServerApp (thin): builds the initial shared tensors, resumes, runs the strategy, reports."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import Config
from common.fileio import write_json_atomic
from common.params import get_arrays, shapes_of, to_record
from common.runs import run_dir
from common.split import split_names
from common.tasks import get_backbone
from server import checkpoint
from server.ledger import Ledger, ledger_meta
from server.recorder import Recorder
from server.report import write_report
from server.secagg import check_secagg, run_secagg
from server.server_opt import ServerOptimizer
from server.strategy import FedpersStrategy
from server.user_dp import UserLevelDP

logging.getLogger("flwr").propagate = False


def run_federation(
    cfg: Config,
    grid: Grid,
    run_id: int,
    context: Context | None = None,
    users: Mapping[int, str] | None = None,
    by_partition: bool = False,
) -> Path:
    """Run (or resume) the federation described by ``cfg``; returns the run folder.

    With ``secagg.enabled`` the training rounds run under Flower's SecAgg+ (server.secagg), which needs
    the ServerApp's ``context``. ``users``: a simulation's partition id → user name, known to the runner
    (never sent by clients), written into the report. Each device is one client in the ledger and the
    report, keyed by its node id (stable for a registered node key); ``by_partition`` (simulations,
    whose node ids change every run) keys simulated clients by their partition id instead. Clients are
    evaluated every ``fed.evaluate-every`` rounds and after the last one.
    """
    out = run_dir(cfg, run_id)
    out.mkdir(parents=True, exist_ok=True)
    flat = cfg.to_run_config()
    backbone = get_backbone(cfg)
    template = backbone.template
    roles = split_names([n for n, _ in template.named_parameters()], cfg.personalization.mode)
    check_secagg(cfg, roles["shared"])
    arrays = get_arrays(template, roles["shared"])
    done = 0
    ckpt = checkpoint.load(out / "checkpoint") if cfg.output.resume else None
    if ckpt is not None:
        checkpoint.check_compatible(ckpt, flat)
        arrays, done = ckpt.arrays, ckpt.server_round
        log(INFO, "resuming from the checkpoint of round %d in %s", done, out)
    write_json_atomic(
        out / "config.json",
        {
            "run_config": flat,
            "run_id": run_id,
            "resumed_after_round": done,
            "versions": checkpoint.versions(),
        },
    )
    model_bytes = backbone.total_params * 4
    ledger = Ledger(
        Path(cfg.output.ledger).expanduser() if cfg.output.ledger else out / "ledger.json",
        meta=ledger_meta(cfg),
    )
    recorder = Recorder(out, cfg.fed.num_rounds, resume=ckpt is not None)
    remaining = cfg.fed.num_rounds - done
    if remaining > 0:
        min_nodes = cfg.fed.min_clients
        strategy = FedpersStrategy(
            expected=shapes_of(template, roles["shared"]),
            personal=set(roles["personal"]),
            ledger=ledger,
            recorder=recorder,
            checkpoint_dir=str(out / "checkpoint"),
            run_config=flat,
            total_rounds=cfg.fed.num_rounds,
            round_offset=done,
            max_update_norm=cfg.fed.max_update_norm,
            user_dp=UserLevelDP.from_config(cfg) if cfg.dp.user_level else None,
            client_key="partition" if by_partition else "node",
            evaluate_every=cfg.fed.evaluate_every,
            server_opt=ServerOptimizer.from_config(cfg, ckpt.velocity if ckpt is not None else None),
            fraction_train=cfg.fed.fraction_train,
            fraction_evaluate=cfg.fed.fraction_evaluate,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes if cfg.fed.fraction_evaluate > 0 else 0,
            min_available_nodes=min_nodes,
        )
        if cfg.secagg.enabled:
            secagg_context = context or Context(run_id, 0, {}, RecordDict(), flat)
            run_secagg(cfg, grid, secagg_context, strategy, arrays)
        else:
            strategy.start(
                grid=grid,
                initial_arrays=to_record(arrays),
                num_rounds=remaining,
                timeout=cfg.fed.round_timeout,
                train_config=ConfigRecord({"num-rounds": cfg.fed.num_rounds}),
                evaluate_config=ConfigRecord({"num-rounds": cfg.fed.num_rounds}),
            )
    write_report(
        out,
        cfg,
        recorder,
        ledger,
        shared_bytes=sum(a.nbytes for a in arrays.values()),
        model_bytes=model_bytes,
        users=users,
    )
    log(INFO, "run written to %s", out)
    return out


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    users: Mapping[int, str] | None = None,
    by_partition: bool = False,
) -> ServerApp:
    """A ServerApp whose configuration is ``context.run_config`` on top of ``overrides``.

    ``users`` (simulation only): the runner's partition id → user name, for clients.csv and report.md.
    """
    base = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = Config.from_run_config({**base, **dict(context.run_config)})
        run_federation(cfg, grid, context.run_id, context, users, by_partition)

    return server_app


app = make_server_app()
