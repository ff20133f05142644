"""DP cost benchmark: one local epoch of the MiniLM LoRA model, non-private vs Opacus grad-sample modes.

Time: all variants in ONE process, interleaved over repeats (median seconds per step, the epoch's
``make_private`` included, as a real round pays it). Memory on the CPU: each (variant, batch) in a FRESH
process: resident memory after the model and features are loaded, then the peak during the epoch (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``); the increment is what training adds.
On a CUDA device (``device="cuda"``) the same epochs run there, timed with the device synchronized, and
memory is the CUDA allocator's: allocated before the epoch and its peak during it (reset per cell, so
every cell runs in the one process).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.bench.fresh_process import call_fresh

VARIANTS = ("non-private", "hooks", "functorch", "ghost")
BATCHES = (16, 32, 64)
TARGET_TIME, TARGET_MEMORY = 1.15, 1.20
BASE: dict[str, Any] = {"task.train-size": 512, "task.test-size": 10, "task.dirichlet-alpha": 100.0}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _setup(threads: int, extra: dict[str, Any], device: str = "cpu") -> tuple[Any, Any]:
    import torch

    from common.config import Config
    from common.device import resolve_device
    from common.tasks import get_task

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    cfg = Config.from_run_config({**BASE, **extra})
    task = get_task(cfg)
    backbone = task.backbone()
    feats = task.features(backbone, task.load(0, 1), "train", device=dev)
    return backbone, feats.to(dev)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch(backbone: Any, feats: Any, variant: str, batch: int, extra: dict[str, Any]) -> tuple[float, int]:
    """Seconds and steps of one epoch of ``variant`` at expected batch ``batch``, on the features' device."""
    import time

    from client.training import DPPlan, sample_rate, train
    from common.config import Config

    dp = variant != "non-private"
    over = {**BASE, **extra, "train.batch-size": batch, "dp.grad-sample-mode": variant if dp else "hooks"}
    cfg = Config.from_run_config(over)
    plan = DPPlan(sigma=1.0, sample_rate=sample_rate(len(feats), batch), delta=1e-3) if dp else None
    device = feats.hidden.device
    model = backbone.new_model().to(device)
    _sync(device)
    start = time.perf_counter()
    out = train(model, feats, cfg, epochs=1, plan=plan, history=[], seed=0)
    _sync(device)  # queued kernels belong to this epoch
    return time.perf_counter() - start, out.steps


def time_variants(
    variants: Sequence[str],
    batches: Sequence[int],
    repeats: int,
    threads: int,
    extra: dict[str, Any] | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Median seconds per step for every (variant, batch), measured interleaved in this process."""
    extra = extra or {}
    backbone, feats = _setup(threads, extra, device)
    rows = []
    for batch in batches:
        _epoch(backbone, feats, "non-private", batch, extra)  # warm-up
        per_step: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(repeats):
            for v in variants:
                seconds, steps = _epoch(backbone, feats, v, batch, extra)
                per_step[v].append(seconds / steps)
        for v in variants:
            rows.append({"variant": v, "batch": batch, "seconds-per-step": statistics.median(per_step[v])})
    return rows


def memory_cell(
    variant: str, batch: int, threads: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Peak resident memory of one epoch in THIS (fresh) process."""
    extra = extra or {}
    backbone, feats = _setup(threads, extra)
    base_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    _epoch(backbone, feats, variant, batch, extra)
    peak_kib = _status_kib("VmHWM")
    return {
        "variant": variant,
        "batch": batch,
        "rss-before-mib": base_kib / 1024,
        "peak-mib": peak_kib / 1024,
        "increment-mib": (peak_kib - base_kib) / 1024,
    }


def cuda_memory(
    variants: Sequence[str],
    batches: Sequence[int],
    threads: int,
    extra: dict[str, Any] | None = None,
    device: str = "cuda",
) -> list[dict[str, Any]]:
    """CUDA allocator memory of one epoch per (variant, batch): allocated before, and the peak during it."""
    import torch

    extra = extra or {}
    backbone, feats = _setup(threads, extra, device)
    rows = []
    for batch in batches:
        for v in variants:
            torch.cuda.synchronize(feats.hidden.device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(feats.hidden.device)
            torch.cuda.reset_peak_memory_stats(feats.hidden.device)
            _epoch(backbone, feats, v, batch, extra)
            peak = torch.cuda.max_memory_allocated(feats.hidden.device)
            rows.append(
                {
                    "variant": v,
                    "batch": batch,
                    "rss-before-mib": base / 2**20,
                    "peak-mib": peak / 2**20,
                    "increment-mib": (peak - base) / 2**20,
                }
            )
    return rows


def measure_memory(
    variants: Sequence[str], batches: Sequence[int], threads: int, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """:func:`memory_cell` for every (variant, batch), each in a fresh Python process."""
    rows = []
    for batch in batches:
        for v in variants:
            rows.append(
                call_fresh("simulations.bench.dp_cost", "memory_cell", v, batch, threads, extra or {},
                           what=f"memory cell {v}/{batch}")
            )  # fmt: skip
    return rows


def merge(times: list[dict[str, Any]], mems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join time and memory rows and add the ratios to non-private at the same batch."""
    mem = {(m["variant"], m["batch"]): m for m in mems}
    tim = {(t["variant"], t["batch"]): t for t in times}
    rows = []
    for (v, b), t in tim.items():
        row = {**t, **mem.get((v, b), {})}
        ref_t, ref_m = tim.get(("non-private", b)), mem.get(("non-private", b))
        if ref_t:
            row["time-ratio"] = t["seconds-per-step"] / ref_t["seconds-per-step"]
        if ref_m and (v, b) in mem:
            row["peak-ratio"] = row["peak-mib"] / ref_m["peak-mib"]
            row["increment-ratio"] = row["increment-mib"] / max(ref_m["increment-mib"], 1e-9)
        rows.append(row)
    return rows


def dp_cost_table(rows: list[dict[str, Any]], default_mode: str, memory: str = "RSS") -> str:
    """Markdown table, the fastest DP mode per batch, and the verdict for the default mode.

    ``memory`` names what the memory columns hold: "RSS" (CPU runs) or "CUDA" (allocator peak).
    """
    from simulations.bench.output import markdown_table

    def r(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "–"

    body = markdown_table(
        ("variant", "batch", "ms / step", "× time", f"peak {memory} MiB", "× peak", "training adds MiB",
         "× added"),
        [
            (
                row["variant"], row["batch"], f"{1000 * row['seconds-per-step']:.1f}",
                r(row, "time-ratio", ".2f"), r(row, "peak-mib", ".0f"), r(row, "peak-ratio", ".2f"),
                r(row, "increment-mib", ".0f"), r(row, "increment-ratio", ".2f"),
            )
            for row in rows
        ],
    )  # fmt: skip
    lines = [body, ""]
    for batch in sorted({row["batch"] for row in rows}):
        dp = [row for row in rows if row["batch"] == batch and row["variant"] != "non-private"]
        if not dp:
            continue
        fastest = min(dp, key=lambda row: row["seconds-per-step"])
        mine = next((row for row in dp if row["variant"] == default_mode), None)
        if mine is None or "time-ratio" not in mine:
            continue
        ok_t = mine["time-ratio"] <= TARGET_TIME
        ok_m = mine.get("peak-ratio", float("inf")) <= TARGET_MEMORY
        lines.append(
            f"- batch {batch}: fastest DP mode **{fastest['variant']}**; default `{default_mode}` "
            f"time ×{mine['time-ratio']:.2f} (target ≤ {TARGET_TIME}: {'met' if ok_t else 'MISSED'}), "
            f"peak {memory} ×{mine.get('peak-ratio', float('nan')):.2f} (target ≤ {TARGET_MEMORY}: "
            f"{'met' if ok_m else 'MISSED'}), memory training adds "
            f"×{mine.get('increment-ratio', float('nan')):.2f}"
        )
    return "\n".join(lines) + "\n"
