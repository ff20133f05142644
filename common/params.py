"""Extract and load tensors of a PersonalModel by name, with strict checks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from common.errors import ParameterError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under an Opacus GradSampleModule (whose keys carry ``_module.``)."""
    while hasattr(model, "_module"):
        model = model._module  # type: ignore[assignment]
    return model


def get_arrays(model: nn.Module, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Copies of the named parameters of the UNWRAPPED model, as float32 numpy arrays."""
    params = dict(unwrap(model).named_parameters())
    out = {}
    for name in names:
        if name not in params:
            raise ParameterError(f"model has no parameter {name!r}")
        out[name] = params[name].detach().cpu().numpy().astype(np.float32, copy=True)
    return out


def check_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str = "shared tensors"
) -> None:
    """Raise ParameterError unless ``arrays`` has exactly the expected keys and shapes, float, finite."""
    got, want = set(arrays), set(expected)
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        raise ParameterError(
            f"{what}: key set mismatch; unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}, "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}"
        )
    for name, arr in arrays.items():
        if tuple(arr.shape) != tuple(expected[name]):
            raise ParameterError(f"{what}: {name} has shape {tuple(arr.shape)}, expected {expected[name]}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ParameterError(f"{what}: {name} has dtype {arr.dtype}, expected a float dtype")
        if not np.all(np.isfinite(arr)):
            raise ParameterError(f"{what}: {name} contains NaN or infinite values")


def shapes_of(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named parameters."""
    params = dict(unwrap(model).named_parameters())
    return {n: tuple(params[n].shape) for n in names}


def set_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray], expected_names: Iterable[str]) -> None:
    """Copy ``arrays`` into the model after checking the exact key set, shapes and values."""
    names = list(expected_names)
    check_arrays(arrays, shapes_of(model, names))
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)))


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A Flower ArrayRecord with the arrays under their parameter names (sorted)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(arrays[name])) for name in sorted(arrays)})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a Flower ArrayRecord by name."""
    return {name: arr.numpy() for name, arr in record.items()}


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays (data only)."""
    return int(sum(a.nbytes for a in arrays.values()))
