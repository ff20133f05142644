"""Write an audit as JSON, Markdown, HTML and a plot of ε over rounds."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from common.fileio import write_bytes_atomic, write_json_atomic

HEADERS = ("client", "ε (ours)", "ε (dp-accounting RDP)", "ε (PLD)", "budget", "steps", "status")


def rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per client (and one for the user-level guarantee), formatted."""
    everyone = list(report["clients"]) + ([report["user_level"]] if "user_level" in report else [])
    return [
        (
            "all users (user-level)" if c["client"] == -1 else str(c["client"]),
            f"{c['epsilon_reported']:.4f}",
            f"{c['epsilon_rdp']:.4f}",
            f"{c['epsilon_pld']:.4f}",
            f"{c['budget']:g}",
            str(c["steps"]),
            c["status"]
            + (": " + "; ".join(c["problems"]) if c["problems"] else "")
            + (" (" + "; ".join(c["notes"]) + ")" if c.get("notes") else ""),
        )
        for c in everyone
    ]


def conventions(report: dict[str, Any]) -> list[str]:
    """The assumptions under which the ε values hold."""
    return [
        f"Neighbouring relation: {report['neighbouring']}.",
        f"Sampling: {report['sampling']} (rate q per step, as recorded); Gaussian noise σ × clipping norm.",
        f"δ: {report['delta_rule']}. Our accountant: Opacus {report['accountant'].upper()}.",
        *(
            [
                f"User-level row: {report['user_neighbouring']}; one Poisson-subsampled Gaussian step "
                "per round (q = cohort / population), δ = min(1e-6, 0.1/population) unless set."
            ]  # fmt: skip
            if "user_level" in report
            else []
        ),
        f"A reported ε more than {100 * report['tolerance']:.0f} % away from the independent accountant "
        "of the same kind (PRV ↔ PLD, RDP ↔ RDP) is inconsistent.",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The audit as Markdown."""
    bad = [c for c in report["clients"] if c["status"] != "ok"]
    lines = [
        f"# Privacy audit of `{report['ledger']}`",
        "",
        f"**{'PASS' if report['ok'] else 'FAIL'}** — {len(report['clients'])} clients, "
        f"{len(bad)} with problems.",
        "",
        *[f"- {c}" for c in conventions(report)],
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
        *["| " + " | ".join(r) + " |" for r in rows(report)],
    ]
    pld = [c["epsilon_pld"] / c["epsilon_reported"] for c in report["clients"] if c["epsilon_reported"] > 0]
    if pld:
        lines += [
            "",
            f"PLD ε / reported ε: {min(pld):.3f}–{max(pld):.3f} (below 1 = ε could be stated tighter).",
        ]
    return "\n".join(lines) + "\n"


def html_page(report: dict[str, Any], plot: str | None) -> str:
    """The audit as a self-contained HTML page."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join(
        "<tr class='{}'>{}</tr>".format(
            "ok" if r[-1] == "ok" else "bad", "".join(f"<td>{html.escape(v)}</td>" for v in r)
        )
        for r in rows(report)
    )
    conv = "".join(f"<li>{html.escape(c)}</li>" for c in conventions(report))
    verdict = "PASS" if report["ok"] else "FAIL"
    img = f"<img src='{html.escape(plot)}' alt='epsilon over rounds'>" if plot else ""
    return (
        "<!doctype html><meta charset='utf-8'><title>fedpers privacy audit</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
        ".bad{background:#fdd}</style>"
        f"<h1>Privacy audit: {verdict}</h1><p>{html.escape(report['ledger'])}</p><ul>{conv}</ul>"
        f"<table><tr>{head}</tr>{body}</table>{img}"
    )


def plot_epsilon(report: dict[str, Any], path: Path) -> None:
    """ε reported after each round, one line per client, with the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for c in report["clients"]:
        pts = c["epsilon_by_round"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, alpha=0.7)
    ax.axhline(report["budget"], color="k", ls="--", lw=1, label=f"budget {report['budget']:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (reported)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_audit(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write audit.json, audit.md, audit.html and audit-epsilon.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"audit.{k}" for k in ("json", "md", "html")}
    paths["png"] = out / "audit-epsilon.png"
    write_json_atomic(paths["json"], report)
    write_bytes_atomic(paths["md"], markdown(report).encode())
    plot_epsilon(report, paths["png"])
    write_bytes_atomic(paths["html"], html_page(report, paths["png"].name).encode())
    return paths
