"""Which accelerator a node trains on, and where mixed precision is numerically safe under DP.

``auto`` picks CUDA, then Apple MPS, then the CPU. Only the *frozen* prefix (no gradients, its output
cached) runs under bfloat16 autocast, and only on CUDA devices that support bf16: the trainable part,
Opacus' per-example gradients, their clipping norms and the Gaussian noise all stay float32, because
clipping in reduced precision changes the sensitivity the accountant assumes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch

from common.errors import ConfigError

_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name`` (auto | cpu | cuda | cuda:N | mps); a missing one is a clear error."""
    name = (name or "auto").strip().lower()
    if not _NAME.match(name):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if name == "mps" and not _mps_available():
        raise ConfigError("device 'mps' asked for, but Apple MPS is not available here")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe(device: torch.device) -> str:
    """A one-line human description (name and memory for CUDA)."""
    if device.type == "cuda":
        index = device.index or 0
        props = torch.cuda.get_device_properties(index)
        return (
            f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 prefix: {_bf16(device)})"
        )
    if device.type == "mps":
        return "mps (Apple GPU, float32)"
    return f"cpu ({torch.get_num_threads()} threads, float32)"


def _bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def frozen_autocast(device: torch.device) -> Iterator[None]:
    """bfloat16 autocast for the frozen prefix on a bf16-capable CUDA device; float32 elsewhere."""
    if _bf16(device):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def place(backbone: Any, device: torch.device) -> None:
    """Put a backbone's frozen prefix and its model template on ``device``, in place.

    A causal backbone's models share the frozen weights with the template (and the tied output projection
    with the prefix's embeddings), so moving one model would move part of the others. Placing the whole
    backbone first keeps every model it makes on one device: they are born where the prefix runs.
    """
    backbone.prefix.to(device)
    backbone.template.to(device)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
