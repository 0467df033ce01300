"""`gauge::materialize_kv`: the gather + re-rotate of a block pool into a contiguous K/V view.

This is what a cache does eagerly so that any attention implementation sees exact keys: gather
each sequence's entries through its block table and re-rotate every key by its entry's delta.
It is O(L*d) per call, and it is exactly the node the gauge passes look for: an attention whose
keys and values come from `materialize_kv` becomes one `rotated_query_attention` over the
untouched pool, with the same table, deltas and token counts.

Schema:

    materialize_kv(Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor block_delta,
        Tensor block_lens, Tensor inv_freq, int rotary_dim, bool interleaved, SymInt length,
        Tensor? k_scale=None, Tensor? v_scale=None, ScalarType? dtype=None) -> (Tensor k, Tensor v)

Entry j of row b is slots [0, block_lens[b, j]) of block block_table[b, j] (the op's mapping); every
row holds exactly `length` tokens; k and v are `[batch, num_kv_heads, length, head_dim]` (the layout
transformers' attention takes), in `dtype` (default: the pools' dtype, float32 for compressed pools, which are
dequantized with their scales `k_scale`/`v_scale`, `gaugecompile.kv_format`).  A cache whose pools are stored in
another format than its model computes in names the model's dtype, so the view reaches the attention as the model
wrote it (no cast between the view and its attention for the passes to see through).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..block_tables import check_mapping_values, full_block_lens, view_entries, view_slots
from ..codegen.native import native_available, native_materialize
from ..kv_format import dequantize, format_of
from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate, rotation_tangent
from .reference import rerotate

__all__ = ["materialize_kv", "materialize_views"]


def view_dtype(k_pool: Tensor, k_scale: Tensor | None, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a view of the pools: `dtype`, else the pools' (float32 for compressed pools)."""
    if dtype is not None:
        return dtype
    return torch.float32 if k_scale is not None else k_pool.dtype


def _check(k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
           length: int, k_scale: Tensor | None, v_scale: Tensor | None, dtype: torch.dtype | None) -> None:
    format_of(k_pool, k_scale, "k_pool")
    format_of(v_pool, v_scale, "v_pool")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating dtype for the view, got {dtype}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(
            f"k_pool/v_pool: expected equal shapes [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    if block_table.dim() != 2 or block_delta.shape != block_table.shape or block_lens.shape != block_table.shape:
        raise ValueError(
            f"block_table/block_delta/block_lens: expected equal shapes [batch, max_blocks], got "
            f"{tuple(block_table.shape)}, {tuple(block_delta.shape)} and {tuple(block_lens.shape)}"
        )
    if length > block_table.shape[1] * k_pool.shape[1]:
        raise ValueError(
            f"length: expected at most max_blocks*block_size = {block_table.shape[1] * k_pool.shape[1]}, got {length}"
        )


def materialize_views(
    k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor, inv_freq: Tensor,
    rotary_dim: int, interleaved: bool, length: int, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The op's meaning in torch ops (its kernel off the CPU, and its ONNX decomposition): gather (and dequantize) +
    re-rotate."""
    out = view_dtype(k_pool, k_scale, dtype)
    cdt = accumulation_dtype(k_pool.dtype)  # rows widened first: a float32 view of bfloat16 pools is rotated in float32
    slots, deltas = view_slots(block_table, block_delta, block_lens, k_pool.shape[1], length)
    gathered = [dequantize(pool.flatten(0, 1)[slots], None if s is None else s.flatten(0, 1)[slots], cdt)
                for pool, s in ((k_pool, k_scale), (v_pool, v_scale))]
    k = rerotate(gathered[0], deltas, inv_freq, rotary_dim, interleaved)  # [B, L, Hkv, D]
    return k.transpose(1, 2).to(out).contiguous(), gathered[1].transpose(1, 2).to(out).contiguous()


@torch.library.custom_op("gauge::materialize_kv", mutates_args=())
def _materialize_op(
    k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor, inv_freq: Tensor,
    rotary_dim: int, interleaved: bool, length: int, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    if k_pool.device.type == "cpu" and k_pool.is_contiguous() and v_pool.is_contiguous() and native_available():
        out = view_dtype(k_pool, k_scale, dtype)
        k, v = native_materialize(k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim,
                                  interleaved, length, k_scale, v_scale, out == k_pool.dtype)
        return k.to(out), v.to(out)
    check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], 0, length)
    return materialize_views(k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved,
                             length, k_scale, v_scale, dtype)


@_materialize_op.register_fake
def _materialize_fake(k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved,
                      length, k_scale=None, v_scale=None, dtype=None):
    head_dim = format_of(k_pool, k_scale).head_dim(k_pool.shape[3])
    shape = (block_table.shape[0], k_pool.shape[2], length, head_dim)
    out = view_dtype(k_pool, k_scale, dtype)
    return k_pool.new_empty(shape, dtype=out), v_pool.new_empty(shape, dtype=out)


def _setup_context(ctx, inputs, output):
    k_pool, _, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved, length, k_scale = inputs[:10]
    # a real-valued delta's gradient needs the keys it rotated (saved only then: a cache writes its pools in place;
    # compressed keys as their values)
    keys = ((k_pool if k_scale is None else dequantize(k_pool, k_scale)),) if block_delta.is_floating_point() else ()
    ctx.save_for_backward(block_table, block_delta, block_lens, inv_freq, *keys)
    ctx.attrs = (k_pool.shape, rotary_dim, interleaved, length, k_scale is not None)


def _backward(ctx, grad_k, grad_v):
    """Adjoint: rotate grad_k back by -delta and scatter-add both into the pools; a real-valued delta's gradient
    is grad_k dotted with the tangents of the keys it rotated (`rotation_tangent`), summed over its entry."""
    block_table, block_delta, block_lens, inv_freq = ctx.saved_tensors[:4]
    pool_shape, rotary_dim, interleaved, length, compressed = ctx.attrs
    block_size = pool_shape[1]
    slots, token_delta = view_slots(block_table, block_delta, block_lens, block_size, length)
    grads, d_delta = [], None
    for g, rotated in ((grad_k, True), (grad_v, False)):
        if compressed and not (rotated and ctx.needs_input_grad[3]):  # codes have no gradient
            grads.append(None)
            continue
        if g is None:
            grads.append(None)
            continue
        g = g.transpose(1, 2)  # [B, L, Hkv, D]
        if rotated:
            cdt = accumulation_dtype(g.dtype)
            cos, sin = delta_cos_sin(token_delta, inv_freq, cdt)
            g = g.to(cdt)
            if ctx.needs_input_grad[3]:
                keys = rerotate(ctx.saved_tensors[4].flatten(0, 1)[slots].to(cdt), token_delta, inv_freq, rotary_dim,
                                interleaved)
                d_delta = _delta_gradient(g, keys, inv_freq, rotary_dim, interleaved, block_lens, length)
            if compressed:
                grads.append(None)
                continue
            g = rotate(g, cos[:, :, None], -sin[:, :, None], rotary_dim, interleaved).to(grad_k.dtype)
        flat = g.new_zeros((pool_shape[0] * block_size, *pool_shape[2:]))
        flat.index_add_(0, slots.reshape(-1), g.reshape(-1, *pool_shape[2:]))
        grads.append(flat.view(pool_shape))
    return grads[0], grads[1], None, d_delta, None, None, None, None, None, None, None, None


def _delta_gradient(grad_k: Tensor, keys: Tensor, inv_freq: Tensor, rotary_dim: int, interleaved: bool,
                    block_lens: Tensor, length: int) -> Tensor:
    """d loss / d block_delta [B, W] from grad_k and the view keys, both [B, L, Hkv, D] in the view's frame: per
    token the dot with the key's rotation tangent, summed over the tokens of each entry."""
    per_token = (grad_k * rotation_tangent(keys, inv_freq, rotary_dim, interleaved)).sum((-1, -2))  # [B, L]
    entry, _ = view_entries(block_lens, length)
    return per_token.new_zeros(block_lens.shape).scatter_add(1, entry, per_token)


_materialize_op.register_autograd(_backward, setup_context=_setup_context)


def materialize_kv(
    k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, rope: RopeSpec, length: int,
    block_lens: Tensor | None = None, *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Gather + re-rotate: K/V `[batch, num_kv_heads, length, head_dim]` of each sequence's view.

    `block_lens` [batch, max_blocks]: the tokens each entry holds (slots [0, n) of its block); None for
    views whose blocks are full but the last.  k_scale/v_scale: the scales of compressed pools; dtype: the views'
    dtype (default: the pools', float32 for compressed pools)."""
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope: expected a gaugecompile.RopeSpec, got {type(rope).__name__}")
    if block_lens is None:
        lengths = torch.full(block_table.shape[:1], length, dtype=torch.int64, device=block_table.device)
        block_lens = full_block_lens(lengths, block_table.shape[1], k_pool.shape[1])
    _check(k_pool, v_pool, block_table, block_delta, block_lens, length, k_scale, v_scale, dtype)
    return torch.ops.gauge.materialize_kv(
        k_pool, v_pool, block_table, block_delta, block_lens, rope.inv_freq.to(k_pool.device), rope.rotary_dim,
        rope.interleaved, length, k_scale, v_scale, dtype,
    )
