"""Run a benchmark function in a fresh Python process (clean imports, caches and memory peak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

_CODE = (
    "import importlib, json, sys; "
    "fn = getattr(importlib.import_module(sys.argv[1]), sys.argv[2]); "
    "print('RESULT ' + json.dumps(fn(*json.loads(sys.argv[3]))))"
)


def call_fresh(module: str, function: str, *args: Any, what: str = "") -> dict[str, Any]:
    """``module.function(*args)`` in a new interpreter; args and result travel as JSON."""
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", _CODE, module, function, json.dumps(args, default=str)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        label = what or f"{module}.{function}"
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result
