"""`gauge::materialize_kv`: the gather + re-rotate of a block pool into a contiguous K/V view.

This is what a cache does eagerly so that any attention implementation sees exact keys: gather
each sequence's blocks through its block table and re-rotate every key by its block's delta.
It is O(L*d) per call, and it is exactly the node the gauge passes look for: an attention whose
keys and values come from `materialize_kv` becomes one `rotated_query_attention` over the
untouched pool, with the same table, deltas and lengths.

Schema:

    materialize_kv(Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor block_delta,
        Tensor inv_freq, int rotary_dim, bool interleaved, SymInt length) -> (Tensor k, Tensor v)

Every sequence's view has exactly `length` tokens; k and v are `[batch, num_kv_heads, length,
head_dim]` (the layout transformers' attention takes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate
from .angles import block_angles
from .checks import check_mapping_values
from .reference import gather_view, rerotate_view, token_deltas, token_slots

__all__ = ["materialize_kv"]


def _check(k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, length: int) -> None:
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(
            f"k_pool/v_pool: expected equal shapes [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    if block_table.dim() != 2 or block_delta.shape != block_table.shape:
        raise ValueError(
            f"block_table/block_delta: expected equal shapes [batch, max_blocks], "
            f"got {tuple(block_table.shape)} and {tuple(block_delta.shape)}"
        )
    if length > block_table.shape[1] * k_pool.shape[1]:
        raise ValueError(
            f"length: expected at most max_blocks*block_size = {block_table.shape[1] * k_pool.shape[1]}, got {length}"
        )


def materialize_views(
    k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, inv_freq: Tensor,
    rotary_dim: int, interleaved: bool, length: int,
) -> tuple[Tensor, Tensor]:
    """The op's meaning in torch ops (its kernel, and its ONNX decomposition): gather + re-rotate."""
    k = gather_view(k_pool, block_table, length)  # [B, L, Hkv, D]
    k = rerotate_view(k, block_delta, k_pool.shape[1], inv_freq, rotary_dim, interleaved)
    v = gather_view(v_pool, block_table, length)
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


@torch.library.custom_op("gauge::materialize_kv", mutates_args=())
def _materialize_op(
    k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, inv_freq: Tensor,
    rotary_dim: int, interleaved: bool, length: int,
) -> tuple[Tensor, Tensor]:
    from ..codegen.native import native_available, native_materialize

    if k_pool.device.type == "cpu" and k_pool.is_contiguous() and v_pool.is_contiguous() and native_available():
        width = -(-length // k_pool.shape[1])
        cdt = accumulation_dtype(k_pool.dtype)
        cos, sin = block_angles(block_delta[:, :width], inv_freq, cdt)
        return native_materialize(k_pool, v_pool, block_table[:, :width], block_delta[:, :width], cos, sin, rotary_dim,
                                  interleaved, length)
    check_mapping_values(block_table, block_delta, length, k_pool.shape[0], k_pool.shape[1], 0, "length")
    return materialize_views(k_pool, v_pool, block_table, block_delta, inv_freq, rotary_dim, interleaved, length)


@_materialize_op.register_fake
def _materialize_fake(k_pool, v_pool, block_table, block_delta, inv_freq, rotary_dim, interleaved, length):
    shape = (block_table.shape[0], k_pool.shape[2], length, k_pool.shape[3])
    return k_pool.new_empty(shape), v_pool.new_empty(shape)


def _setup_context(ctx, inputs, output):
    k_pool, v_pool, block_table, block_delta, inv_freq, rotary_dim, interleaved, length = inputs
    ctx.save_for_backward(block_table, block_delta, inv_freq)
    ctx.attrs = (k_pool.shape, rotary_dim, interleaved, length)


def _backward(ctx, grad_k, grad_v):
    """Adjoint: rotate grad_k back by -delta and scatter-add both into the pools."""
    block_table, block_delta, inv_freq = ctx.saved_tensors
    pool_shape, rotary_dim, interleaved, length = ctx.attrs
    block_size = pool_shape[1]
    token_delta = token_deltas(block_delta, block_size, length)
    slots = token_slots(block_table, block_size, length)
    grads = []
    for g, rotated in ((grad_k, True), (grad_v, False)):
        if g is None:
            grads.append(None)
            continue
        g = g.transpose(1, 2)  # [B, L, Hkv, D]
        if rotated:
            cdt = accumulation_dtype(g.dtype)
            cos, sin = delta_cos_sin(token_delta, inv_freq, cdt)
            g = rotate(g.to(cdt), cos[:, :, None], -sin[:, :, None], rotary_dim, interleaved).to(g.dtype)
        flat = g.new_zeros((pool_shape[0] * block_size, *pool_shape[2:]))
        flat.index_add_(0, slots.reshape(-1), g.reshape(-1, *pool_shape[2:]))
        grads.append(flat.view(pool_shape))
    return grads[0], grads[1], None, None, None, None, None, None


_materialize_op.register_autograd(_backward, setup_context=_setup_context)


def materialize_kv(
    k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, rope: RopeSpec, length: int
) -> tuple[Tensor, Tensor]:
    """Gather + re-rotate: K/V `[batch, num_kv_heads, length, head_dim]` of each sequence's view."""
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope: expected a gaugecompile.RopeSpec, got {type(rope).__name__}")
    _check(k_pool, v_pool, block_table, block_delta, length)
    return torch.ops.gauge.materialize_kv(
        k_pool, v_pool, block_table, block_delta, rope.inv_freq.to(k_pool.device), rope.rotary_dim,
        rope.interleaved, length,
    )
