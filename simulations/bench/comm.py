"""Communication benchmark: bytes on the wire per client per round, for every mode and LoRA rank.

Sizes are the protobuf encodings Flower puts on the wire (``recorddict_to_proto``) of the exact records
fedpers sends: the train message (shared arrays + config), the train reply (shared arrays + metrics),
the evaluate message (shared arrays + config) and its reply (metrics only). The full model is every
parameter of the encoder plus LoRA and head in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from common import protocol as P
from common.config import MODES, Config
from common.params import get_arrays, to_record
from common.split import split_names
from common.tasks import get_backbone
from simulations.bench.output import markdown_table

RANKS = (4, 8, 16)
TARGET_FRACTION = 0.005  # ≤ 0.5 % of the full model at r = 8


def wire_bytes(content: RecordDict) -> int:
    """Bytes of the protobuf encoding of a message's content."""
    return len(recorddict_to_proto(content).SerializeToString())


def _train_metrics() -> MetricRecord:
    """A train reply's metrics as a client sends them (values do not change the encoded size)."""
    keys = (
        P.NUM_EXAMPLES, P.PARTITION_ID, P.LOSS, P.ACC_BEFORE, P.ACC_AFTER, P.EPSILON, P.DELTA, P.SIGMA,
        P.SAMPLE_RATE, P.STEPS, P.TOTAL_STEPS, P.MAJORITY_ACC, P.BYTES_UP, P.TRAIN_SECONDS,
    )  # fmt: skip
    return MetricRecord({k: 0.123456789 for k in keys})


def _eval_metrics() -> MetricRecord:
    keys = (P.NUM_EXAMPLES, P.PARTITION_ID, P.EVAL_ACC, P.EVAL_LOSS, P.MAJORITY_ACC)
    return MetricRecord({k: 0.123456789 for k in keys})


def measure(base: dict[str, Any], mode: str, rank: int) -> dict[str, Any]:
    """Bytes per client per round for ``mode`` at LoRA rank ``rank`` (on top of ``base`` overrides)."""
    cfg = Config.from_run_config({**base, "personalization.mode": mode, "lora.r": rank})
    backbone = get_backbone(cfg)
    names = split_names([n for n, _ in backbone.template.named_parameters()], mode)
    arrays: ArrayRecord = to_record(get_arrays(backbone.template, names["shared"]))
    config = ConfigRecord({P.SERVER_ROUND: 1, P.FINAL_ROUND: 0})
    train_down = wire_bytes(RecordDict({P.ARRAYS: arrays, P.CONFIG: config}))
    train_up = wire_bytes(RecordDict({P.ARRAYS: arrays, P.METRICS: _train_metrics()}))
    eval_down = wire_bytes(RecordDict({P.ARRAYS: arrays, P.CONFIG: config}))
    eval_up = wire_bytes(RecordDict({P.METRICS: _eval_metrics()}))
    model_bytes = 4 * backbone.total_params
    payload = sum(int(a.numpy().nbytes) for a in arrays.values())
    return {
        "mode": mode,
        "lora-r": rank,
        "shared-tensors": len(names["shared"]),
        "personal-tensors": len(names["personal"]),
        "shared-payload-bytes": payload,
        "train-down": train_down,
        "train-up": train_up,
        "eval-down": eval_down,
        "eval-up": eval_up,
        "up-per-round": train_up + eval_up,
        "down-per-round": train_down + eval_down,
        "model-bytes": model_bytes,
        "up-fraction": (train_up + eval_up) / model_bytes,
    }


def run_comm(
    base: dict[str, Any], modes: Sequence[str] = MODES, ranks: Sequence[int] = RANKS
) -> list[dict[str, Any]]:
    """Measure every (mode, rank) pair."""
    return [measure(base, mode, r) for r in ranks for mode in modes]


def comm_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table plus the target verdict for the default mode at r = 8."""
    body = markdown_table(
        ("mode", "r", "shared tensors", "up / round (B)", "down / round (B)", "up % of model"),
        [
            (
                r["mode"],
                r["lora-r"],
                r["shared-tensors"],
                f"{r['up-per-round']:,}",
                f"{r['down-per-round']:,}",
                f"{100 * r['up-fraction']:.3f} %",
            )
            for r in rows
        ],
    )
    lines = [body]
    target = [r for r in rows if r["mode"] == "fedper" and r["lora-r"] == 8]
    if target:
        frac = target[0]["up-fraction"]
        verdict = "met" if frac <= TARGET_FRACTION else "MISSED"
        lines.append(
            f"\nTarget ≤ {100 * TARGET_FRACTION:.1f} % of the full model up per client per round for "
            f"fedper at r = 8: **{verdict}** ({100 * frac:.3f} %; full model "
            f"{target[0]['model-bytes']:,} B).\n"
        )
    return "".join(lines)
