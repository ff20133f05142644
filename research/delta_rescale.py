"""ε of the committed quality grid's clients at today's default δ, from their committed ledgers.

The grid of BENCHMARKS.md §5 ran before the δ rule changed: σ was calibrated so that each client ends at
its ε budget with δ = 1/n_train. This recomputes, for every client of every private cell, ε of the very
same (σ, q, steps) history at δ = min(1e-5, 0.1/n_train) with the client's own accountant (PRV), and
prints the range per budget. Nothing is retrained; the privacy of those runs is what it was, stated at a
δ an auditor accepts.

    python -m research.delta_rescale [results/quality/cells] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from common.privacy import SAMPLE_DELTA, default_delta, epsilon


def client_histories(ledger: dict) -> dict[int, tuple[list[tuple[float, float, int]], float]]:
    """Per client: its (σ, q, steps) history and the δ it was accounted at (1/n)."""
    out: dict[int, tuple[list[tuple[float, float, int]], float]] = {}
    for e in ledger["entries"]:
        if "sigma" in e and "client" in e:
            history, _ = out.get(int(e["client"]), ([], 0.0))
            history.append((float(e["sigma"]), float(e["sample-rate"]), int(e["steps"])))
            out[int(e["client"])] = (history, float(e["delta"]))
    return out


def rescale(cells: Path) -> dict[str, dict[str, float]]:
    """Per privacy level: min/max ε at δ = 1/n (as run) and at min(1e-5, 0.1/n), over all clients."""
    found: dict[str, dict[str, list[float]]] = {}
    for path in sorted(cells.glob("*/eps*/*/seed*.ledger.json.gz")):
        level = path.parent.parent.name
        with gzip.open(path) as fh:
            ledger = json.loads(fh.read())
        for history, delta_run in client_histories(ledger).values():
            n = round(1.0 / delta_run)
            row = found.setdefault(level, {"as-run": [], "default": []})
            row["as-run"].append(epsilon(history, delta_run, "prv"))
            row["default"].append(epsilon(history, default_delta(n, SAMPLE_DELTA), "prv"))
    return {
        level: {
            "clients": len(v["as-run"]),
            "eps-as-run-max": max(v["as-run"]),
            "eps-default-delta-min": min(v["default"]),
            "eps-default-delta-max": max(v["default"]),
        }
        for level, v in sorted(found.items())
    }


def main() -> None:
    """Print the table (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="?", type=Path, default=Path("results/quality/cells"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    table = rescale(args.cells)
    print("| budget | client-runs | ε at δ = 1/n (as run), max | ε at δ = min(1e-5, 0.1/n) |")
    print("|---|---|---|---|")
    for level, r in table.items():
        print(
            f"| {level} | {r['clients']} | {r['eps-as-run-max']:.2f} | "
            f"{r['eps-default-delta-min']:.2f}–{r['eps-default-delta-max']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
