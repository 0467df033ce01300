"""Run an exported model with onnxruntime, checking inputs against the model's signature first.

onnxruntime's own errors for a wrong feed name, rank or dtype are terse and name no shapes;
this checks each input against the graph signature and raises ValueError/TypeError naming the
input and what the model expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

__all__ = ["run"]

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _as_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"inputs[{name!r}]: expected a numpy array or torch.Tensor, got {type(value).__name__}")


def _check(arg: ort.NodeArg, value: np.ndarray) -> None:
    name, shape = arg.name, arg.shape
    if value.ndim != len(shape):
        raise ValueError(f"inputs[{name!r}]: expected rank {len(shape)} (shape {shape}), got shape {value.shape}")
    for axis, (want, got) in enumerate(zip(shape, value.shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise ValueError(f"inputs[{name!r}]: dim {axis} must be {want} (shape {shape}), got shape {value.shape}")
    want_dtype = _ORT_DTYPES.get(arg.type)
    if want_dtype is None:
        raise TypeError(f"inputs[{name!r}]: the model takes {arg.type}, which this helper does not feed")
    if value.dtype != want_dtype:
        raise TypeError(f"inputs[{name!r}]: expected dtype {np.dtype(want_dtype).name}, got {value.dtype.name}")


def _feeds(session: ort.InferenceSession, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
    args = session.get_inputs()
    names = [a.name for a in args]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise ValueError(f"inputs: the model takes {names}; missing {missing}, unexpected {extra}")
        values = [inputs[n] for n in names]
    elif isinstance(inputs, (list, tuple)):
        if len(inputs) != len(names):
            raise ValueError(f"inputs: the model takes {len(names)} inputs {names}, got {len(inputs)}")
        values = list(inputs)
    else:
        raise TypeError(f"inputs: expected a mapping name -> array or a sequence, got {type(inputs).__name__}")
    feeds = {}
    for arg, value in zip(args, values, strict=True):
        array = _as_array(arg.name, value)
        _check(arg, array)
        feeds[arg.name] = np.ascontiguousarray(array)
    return feeds


def run(
    path: str | os.PathLike[str],
    inputs: Mapping[str, Any] | Sequence[Any],
    providers: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Run the ONNX model at `path` on `inputs` (name -> array, or arrays in signature order).

    `providers` defaults to the CPU provider; each must be available in this onnxruntime build.
    Returns the outputs as numpy arrays, in the model's output order.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no ONNX file at {path!r}")
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"] if providers is None else list(providers)
    unknown = [p for p in providers if p not in available]
    if not providers or unknown:
        raise ValueError(f"providers: expected a non-empty subset of {available}, got {providers}")
    session = ort.InferenceSession(path, providers=providers)
    return session.run(None, _feeds(session, inputs))
