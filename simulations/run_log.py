"""A quiet console for ``fedpers simulate``: Flower, Ray, Opacus and torch output goes to the run's log.

The redirect is at the file-descriptor level (1 and 2), so it also takes what Ray forwards from its actor
processes and what C extensions print; the console keeps a stream to the original terminal for the
progress bars, fedpers' own warnings (each distinct one once, numbers aside) and the results. With
``verbose`` nothing is redirected (the console shows everything, as before) and Flower's log lines are
also appended to the log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

LOG_NAME = "log.txt"
_OURS = {"common", "client", "server", "simulations", "cli"}
_ROOT = Path(__file__).resolve().parents[1]


def is_ours(pathname: str) -> bool:
    """Whether a log record's source file is one of fedpers' packages."""
    try:
        parts = Path(pathname).resolve().relative_to(_ROOT).parts
    except ValueError:
        return False
    return bool(parts) and parts[0] in _OURS


class WarningsOnce(logging.Handler):
    """Passes each distinct fedpers warning (digits aside: rounds, nodes, ε) once to ``show``."""

    def __init__(self, show: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.show = show
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        """Show ``record`` if it is fedpers' and its kind was not shown yet."""
        if not is_ours(record.pathname):
            return
        message = record.getMessage()
        kind = re.sub(r"\d+(\.\d+)?", "#", message)
        if kind not in self.seen:
            self.seen.add(kind)
            self.show(message)


@contextlib.contextmanager
def run_log(
    path: Path, verbose: bool = False, show_warning: Callable[[str], None] | None = None
) -> Iterator[TextIO | None]:
    """Send everything written to fds 1 and 2 to ``path``; yield a stream to the original terminal.

    With ``verbose`` nothing is redirected and ``None`` is yielded. ``show_warning`` receives fedpers'
    warnings (see :class:`WarningsOnce`) when they would otherwise only reach the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flower = logging.getLogger("flwr")
    if verbose:
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        flower.addHandler(handler)
        try:
            yield None
        finally:
            flower.removeHandler(handler)
            handler.close()
        return
    with _fds_to(path) as terminal:
        handler = WarningsOnce(show_warning or (lambda _: None))
        flower.addHandler(handler)
        try:
            yield terminal
        finally:
            flower.removeHandler(handler)


@contextlib.contextmanager
def _fds_to(path: Path) -> Iterator[TextIO]:
    """Point fds 1 and 2 at ``path`` (appending); yield a line-buffered stream to the former fd 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8")
    try:
        with path.open("a", encoding="utf-8") as log:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            try:
                yield terminal
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                for fd, old in saved.items():
                    os.dup2(old, fd)
    finally:
        for old in saved.values():
            os.close(old)
        terminal.close()


def keep_log(run_dir: Path) -> Path | None:
    """Copy ``run_dir``'s log beside the folder (``<run_dir>.log.txt``) before a failed run is removed."""
    log = run_dir / LOG_NAME
    if not log.is_file():
        return None
    kept = run_dir.with_name(f"{run_dir.name}.{LOG_NAME}")
    kept.write_bytes(log.read_bytes())
    return kept
