"""The DP-cost benchmark measures real epochs (tiny model here) and reports ratios to non-private."""

from __future__ import annotations

import pytest

from simulations.bench.dp_cost import dp_cost_table, measure_memory, merge, time_variants

TINY = {"model.name": "tiny", "model.frozen-layers": 1, "task.train-size": 48}


@pytest.mark.slow  # times real epochs of three variants
def test_dp_cost_times_and_memory_on_a_tiny_model() -> None:
    variants = ("non-private", "hooks", "ghost")
    times = time_variants(variants, [16], repeats=1, threads=1, extra=TINY)
    mems = measure_memory(("non-private", "hooks"), [16], threads=1, extra=TINY)
    rows = merge(times, mems)
    by = {r["variant"]: r for r in rows}
    assert set(by) == set(variants) and all(r["seconds-per-step"] > 0 for r in rows)
    assert by["non-private"]["time-ratio"] == 1.0 and by["hooks"]["peak-mib"] > 100
    assert "peak-ratio" in by["hooks"] and "peak-ratio" not in by["ghost"]  # ghost memory not measured
    table = dp_cost_table(rows, "hooks")
    assert "| hooks | 16 |" in table and "default `hooks` time ×" in table
