"""Run an exported model with onnxruntime, checking inputs against the model's signature first.

onnxruntime's own errors for a wrong feed name, rank or dtype are terse and name no shapes;
this checks each input against the graph signature and raises ValueError/TypeError naming the
input and what the model expects.  Exported graphs cannot check values (ONNX has no assert, and a
gather wraps negative ids), so the mapping inputs of the two exported forms -- the op
(`q, k_pool, ..., block_lens` or `seq_lens`) and a `CacheStep` (`block_table, block_delta, block_lens,
slots, view_sizes, k_pools_*`) -- are checked here against the pools they index, as the kernels check them
(`gaugecompile.block_tables.check_mapping_values`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

__all__ = ["run", "checked_feeds"]

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


def checked_feeds(session: ort.InferenceSession,
                  inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
    """`inputs` (name -> array, or arrays in signature order; numpy arrays or tensors) as the feed of `session`:
    contiguous numpy arrays by input name, each checked against the signature (names, rank, fixed dims, dtype)
    and the mapping inputs against the pools they index (`_check_mapping`).  ValueError/TypeError name the input
    and what the model expects, where onnxruntime's own errors would not, and where a graph could not check at
    all (an out-of-range block id is gathered, not refused).  `run` and `OrtCausalLM` feed through it."""
    feeds = _signature_feeds(session, inputs)
    _check_mapping(feeds)
    return feeds


def _signature_feeds(session: ort.InferenceSession,
                     inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
    """The feed by input name, each array checked against the signature only."""
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


def _check_mapping(feeds: dict[str, np.ndarray]) -> None:
    """Block ids, token counts, deltas and write slots of a feed, against the pools they index."""
    from ..block_tables import as_block_lens, check_mapping_values

    pool = feeds.get("k_pool", feeds.get("k_pools_0"))
    if pool is None or "block_table" not in feeds or "block_delta" not in feeds or pool.ndim != 4:
        return
    num_blocks, block_size = pool.shape[:2]
    table, delta = torch.from_numpy(feeds["block_table"]), torch.from_numpy(feeds["block_delta"])
    lens = feeds.get("block_lens", feeds.get("seq_lens"))
    if lens is not None and "q" in feeds:
        block_lens = as_block_lens(torch.from_numpy(lens), table, torch.from_numpy(pool), feeds["q"].shape[2])
        check_mapping_values(table, delta, block_lens, num_blocks, block_size, feeds["q"].shape[2])
    elif lens is not None and "view_sizes" in feeds and "input_ids" in feeds:
        check_mapping_values(table, delta, torch.from_numpy(lens), num_blocks, block_size, feeds["input_ids"].shape[1],
                             int(feeds["view_sizes"].shape[1]))
    if "slots" in feeds and feeds["slots"].size:
        slots = feeds["slots"].reshape(-1)
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= num_blocks * block_size:
            raise ValueError(f"inputs['slots']: expected pool slots in [0, num_blocks*block_size="
                             f"{num_blocks * block_size}), got min {lo}, max {hi}")
        if np.unique(slots).size != slots.size:
            raise ValueError("inputs['slots']: expected distinct slots (two new tokens would write the same one)")


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
    return session.run(None, checked_feeds(session, inputs))
