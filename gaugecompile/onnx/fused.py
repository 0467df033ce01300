"""The `ai.gauge` node bound to the project's kernel inside onnxruntime, through onnxruntime-extensions.

Stock onnxruntime runs the node's model-local function (a gather and re-rotation of the whole view in
standard ops).  `fused_copy(path)` writes a copy of an exported file whose `RotatedQueryAttention` nodes are
in onnxruntime-extensions' custom domain, and `fused_session(copy)` opens it with the extensions library, whose
Python custom op calls `gauge::rotated_query_attention` (the native CPU kernel: blocks read in place, the
query rotated per block) on the node's inputs, zero-copy.  Same contract, same results; float32 files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .function import DOMAIN, OP_TYPE

__all__ = ["fused_copy", "fused_session"]

#: onnxruntime-extensions' domain for Python custom ops.
CONTRIB = "ai.onnx.contrib"
_REGISTERED: list = []


def _register() -> None:
    """Declare the Python custom op once a process (float32 q and pools, int64 mapping, float64 inv_freq)."""
    if _REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i64, f64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_double

    @onnx_op(op_type=OP_TYPE, inputs=[f32, f32, f32, i64, i64, i64, f64], outputs=[f32, f32],
             attrs={"rotary_dim": i64, "interleaved": i64, "scale": PyCustomOpDef.dt_float, "causal": i64,
                    "block_size": i64})
    def rotated_query_attention(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, **attrs):
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k_pool, v_pool, block_table, block_delta,
                                                                    block_lens, inv_freq)]
        out, lse = torch.ops.gauge.rotated_query_attention(*args, int(attrs["rotary_dim"]),
                                                           bool(attrs["interleaved"]), float(attrs["scale"]),
                                                           bool(attrs["causal"]))
        return out.numpy(), lse.to(out.dtype).numpy()

    _REGISTERED.append(rotated_query_attention)


def fused_copy(path: str | os.PathLike[str]) -> Path:
    """`<path stem>.fused.onnx` beside `path`: its gauge nodes moved to the extensions' domain (written once)."""
    path = Path(path)
    out = path.with_name(path.stem + ".fused.onnx")
    if out.is_file() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    model = onnx.load(path)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    if not nodes:
        raise ValueError(f"path: {path} has no {DOMAIN}::{OP_TYPE} node to bind")
    for node in nodes:
        node.domain = CONTRIB
    model.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
    onnx.save_model(model, out, save_as_external_data=model.ByteSize() >= 2**31, location=out.name + ".data")
    return out


def fused_session(path: str | os.PathLike[str], providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session over a `fused_copy`, with the extensions library that runs its gauge nodes.

    The session's intra-op threads do not spin between nodes: the gauge node runs the native kernel on
    torch's thread pool, and onnxruntime's spinning threads took the same cores from it (a decode step of
    SmolLM2-135M at 4k tokens went from 227 ms to 96 ms on a 2-core box when they stopped).
    """
    from onnxruntime_extensions import get_library_path

    _register()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), options, providers=list(providers or ["CPUExecutionProvider"]))
