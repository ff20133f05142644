"""Where benchmarks write: ``runs/bench-<name>-<id>/`` (result.json, table.md, PNGs) and BENCHMARKS.md.

Each benchmark fills one :class:`BenchRun`. ``BENCHMARKS.md`` keeps hand-written analysis; the tables
between ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` are replaced by the latest run, so the
published figures are always the ones a command printed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.fileio import write_bytes_atomic, write_json_atomic

PACKAGES = ("torch", "flwr", "opacus", "peft", "transformers", "pfl")


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and the package versions a figure depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    with contextlib.suppress(ValueError, OSError):
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory-gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "gpu": "none",
        "packages": versions,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are shown with 3 decimals unless already strings."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class BenchRun:
    """One benchmark run's folder and results."""

    name: str
    command: str
    root: Path = Path("runs")
    folder: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9-]+", self.name):
            raise ConfigError(f"benchmark name {self.name!r} must be lower-case letters, digits and '-'")
        if self.folder is None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
            self.folder = self.root / f"bench-{self.name}-{stamp}"
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def dir(self) -> Path:
        """The run's folder."""
        if self.folder is None:  # set in __post_init__
            raise RuntimeError("BenchRun has no folder")
        return self.folder

    def save(self, table: str) -> None:
        """Write ``result.json`` (results + machine + command) and ``table.md``."""
        write_json_atomic(
            self.dir / "result.json",
            {
                "benchmark": self.name,
                "command": self.command,
                "machine": machine_info(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
                "seconds": round(time.time() - self.started, 1),
                "results": self.results,
            },
        )
        write_bytes_atomic(self.dir / "table.md", table.encode())

    def publish(self, table: str, benchmarks_md: Path = Path("BENCHMARKS.md")) -> None:
        """Replace this benchmark's block in BENCHMARKS.md with ``table`` plus machine and command."""
        info = machine_info()
        pk = info["packages"]
        block = (
            f"Command: `{self.command}` — run {time.strftime('%Y-%m-%d', time.gmtime(self.started))}, "
            f"output `{self.dir}`.\n"
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory-gib']} GiB, no GPU; "
            f"torch {pk['torch']}, flwr {pk['flwr']}, opacus {pk['opacus']}.\n\n" + table
        )
        update_block(benchmarks_md, self.name, block)


def update_block(path: Path, name: str, body: str) -> None:
    """Replace (or append) the ``<!-- bench:name -->`` block of a Markdown file."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    found = pattern.search(text) is not None
    text = pattern.sub(lambda _m: new, text) if found else text.rstrip() + f"\n\n{new}\n"
    write_bytes_atomic(path, text.encode())
