"""How the gauge ops leave the exported program before ONNX translation.

- `gauge::rotated_query_attention` becomes `torch.onnx.ops.symbolic_multi_out`, which the exporter
  writes verbatim as one `ai.gauge::RotatedQueryAttention` node (defined by `function.py`).
- `gauge::materialize_kv` that the passes left in place (a refused site) becomes its gather +
  re-rotate in standard torch ops, so a refused site still exports and computes exactly what it
  computed eagerly -- the same exact float64 angles, just without the custom node.
"""

from __future__ import annotations

import torch

from ..ops.materialize import materialize_views
from ..rope import accumulation_dtype
from .function import DOMAIN, OP_TYPE, VERSION

__all__ = ["DECOMPOSITIONS"]


def _rotated_query_attention(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim,
                             interleaved, scale, causal, window=0, softcap=0.0, k_scale=None, v_scale=None):
    if k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale: the ai.gauge node reads float pools; {k_pool.dtype} pools with scales (a "
                         "compressed kv_dtype) do not export yet")
    if window:
        raise ValueError(f"window: the ai.gauge node has no sliding window (got window={window}); export models "
                         "whose attention layers see their whole view")
    if softcap:
        raise ValueError(f"softcap: the ai.gauge node has no logit soft-capping (got softcap={softcap})")
    if block_delta.is_floating_point():
        raise TypeError(f"block_delta: the ai.gauge node takes integer deltas (int32/int64), got {block_delta.dtype}; "
                        "real-valued (learnable) offsets are for training: round them to integers to export")
    block_size = k_pool.shape[1]
    if not isinstance(block_size, int):
        raise ValueError("k_pool: the block size (dim 1) must be static for ONNX export, got a dynamic dim")
    out, lse = torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::{OP_TYPE}",
        [q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq],
        {"rotary_dim": int(rotary_dim), "interleaved": int(bool(interleaved)), "scale": float(scale),
         "causal": int(bool(causal)), "block_size": block_size},
        dtypes=(q.dtype, q.dtype),
        shapes=(q.shape, q.shape[:3]),
        version=VERSION,
    )
    # The node's lse has q's dtype; the op's lse is float32 unless q is float64.
    return out, lse.to(accumulation_dtype(q.dtype))


#: The decomposition table given to `ExportedProgram.run_decompositions` before ONNX export.
DECOMPOSITIONS = {
    torch.ops.gauge.rotated_query_attention.default: _rotated_query_attention,
    torch.ops.gauge.materialize_kv.default: materialize_views,
}
