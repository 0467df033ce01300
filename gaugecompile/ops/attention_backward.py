"""Gradients of rotated-query attention for q, k_pool, v_pool and (real-valued) block deltas:
`gauge::rotated_query_attention_backward` and `op_gradients`, the one adjoint of every implementation.

Schema:

    rotated_query_attention_backward(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k_pool,
        Tensor v_pool, Tensor block_table, Tensor block_delta, Tensor block_lens, Tensor inv_freq,
        int rotary_dim, bool interleaved, float scale, bool causal, int window=0, float softcap=0.0,
        Tensor? k_scale=None, Tensor? v_scale=None) -> (Tensor dq, Tensor dk_pool, Tensor dv_pool, Tensor d_block_delta)

Written out (not autograd) because it runs inside a custom-op kernel, where autograd is off.
Per sequence it re-forms the view exactly as the reference does (O(L*d), like any attention
backward), applies the softmax-attention adjoint, rotates the key gradient back to storage by
R(delta)^T = R(-delta), and scatter-adds both gradients into the pool slots the view read.  Compressed pools
(with scales) are dequantized first: their codes have no gradient, so dk_pool/dv_pool are then the gradients of the
dequantized values (q's dtype), which `op_gradients` drops; dq and the deltas' gradient are exact as for floats.  A
learnable delta moves every key of its entry along the rotation's tangent (`rotation_tangent`), so its
gradient is the view keys' gradient dotted with their tangents, summed over the entry's tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..block_tables import view_tokens
from ..kv_format import dequantized_pools
from ..rope import accumulation_dtype, delta_cos_sin, rotate, rotation_tangent
from .masks import hidden_keys
from .reference import rerotate

__all__ = ["attention_backward", "op_gradients"]


def _sequence_backward(grad_out, grad_lse, q, k_pool, v_pool, slots, deltas, inv_freq, rotary_dim, interleaved,
                       scale, causal, window, softcap, delta_grad):
    """dq [H, Q, D], dK and dV [L, Hkv, D] (dK rotated back to storage) and d delta per token [L] (None unless
    `delta_grad`) of one sequence whose view is pool slots `slots` rotated by `deltas`."""
    length = slots.shape[0]
    k = rerotate(k_pool.flatten(0, 1)[slots], deltas, inv_freq, rotary_dim, interleaved)
    v = v_pool.flatten(0, 1)[slots]
    num_heads, q_len, _ = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    kh = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
    vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
    raw = (q @ kh.transpose(-1, -2)) * scale
    capped = torch.tanh(raw / softcap) if softcap else None
    scores = softcap * capped if softcap else raw
    hidden = hidden_keys(q_len, length, causal, window, q.device)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(scores, dim=-1)  # [H, Q, L]
    out = p @ vh
    dp = grad_out @ vh.transpose(-1, -2)
    # d/dS of (sum dO*O + sum dlse*lse): softmax adjoint plus dlse/dS = P
    ds = p * (dp - (grad_out * out).sum(-1, keepdim=True) + grad_lse[..., None])
    if softcap:  # d/dx of c * tanh(x / c) = 1 - tanh^2
        ds = ds * (1 - capped * capped)
    dq = (ds @ kh) * scale
    dk = ((ds.transpose(-1, -2) @ q) * scale).view(num_kv, group, length, -1).sum(1).transpose(0, 1)
    dv = (p.transpose(-1, -2) @ grad_out).view(num_kv, group, length, -1).sum(1).transpose(0, 1)
    d_delta = (dk * rotation_tangent(k, inv_freq, rotary_dim, interleaved)).sum((-1, -2)) if delta_grad else None
    cos, sin = delta_cos_sin(deltas, inv_freq, dk.dtype)
    return dq, rotate(dk, cos[:, None], -sin[:, None], rotary_dim, interleaved), dv, d_delta


def attention_backward(
    grad_out: Tensor, grad_lse: Tensor, q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor,
    block_delta: Tensor, block_lens: Tensor, inv_freq: Tensor, rotary_dim: int, interleaved: bool, scale: float,
    causal: bool, window: int = 0, softcap: float = 0.0, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk_pool, dv_pool, d_block_delta) for the op's (out, lse) cotangents; computed in float32/float64.

    d_block_delta ([batch, max_blocks], the accumulation dtype) is the gradient of real-valued deltas, and zero
    for integer ones (which have none)."""
    cdt = accumulation_dtype(q.dtype)
    if k_scale is not None:
        k_pool, v_pool = dequantized_pools(k_pool, v_pool, k_scale, v_scale, q.dtype)
    block_size = k_pool.shape[1]
    delta_grad = block_delta.is_floating_point()
    k32, v32 = k_pool.to(cdt), v_pool.to(cdt)
    dq = torch.empty(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros((k_pool.shape[0] * block_size, *k_pool.shape[2:]), dtype=cdt, device=q.device)
    dv = torch.zeros_like(dk)
    d_delta = torch.zeros(block_delta.shape, dtype=cdt, device=q.device)
    entry = torch.arange(block_table.shape[1], device=q.device)[:, None].expand(-1, block_size)
    for b in range(q.shape[0]):
        slots, deltas = view_tokens(block_table[b], block_delta[b], block_lens[b], block_size)
        dq[b], dk_b, dv_b, dd_b = _sequence_backward(
            grad_out[b].to(cdt), grad_lse[b].to(cdt), q[b].to(cdt), k32, v32, slots, deltas, inv_freq, rotary_dim,
            interleaved, scale, causal, window, softcap, delta_grad,
        )
        dk.index_add_(0, slots, dk_b)
        dv.index_add_(0, slots, dv_b)
        if delta_grad:
            held = torch.arange(block_size, device=q.device)[None, :] < block_lens[b].to(torch.int64)[:, None]
            d_delta[b].index_add_(0, entry[held], dd_b)
    return (dq.to(q.dtype), dk.view(k_pool.shape).to(k_pool.dtype), dv.view(v_pool.shape).to(v_pool.dtype),
            d_delta)


@torch.library.custom_op("gauge::rotated_query_attention_backward", mutates_args=())
def _rqa_backward_op(
    grad_out: Tensor, grad_lse: Tensor, q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor,
    block_delta: Tensor, block_lens: Tensor, inv_freq: Tensor, rotary_dim: int, interleaved: bool,
    scale: float, causal: bool, window: int = 0, softcap: float = 0.0, k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return attention_backward(grad_out, grad_lse, q, k_pool, v_pool, block_table, block_delta, block_lens,
                              inv_freq, rotary_dim, interleaved, scale, causal, window, softcap, k_scale, v_scale)


@_rqa_backward_op.register_fake
def _rqa_backward_fake(grad_out, grad_lse, q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq,
                       rotary_dim, interleaved, scale, causal, window=0, softcap=0.0, k_scale=None, v_scale=None):
    d_delta = block_delta.new_empty(block_delta.shape, dtype=accumulation_dtype(q.dtype))
    if k_scale is not None:  # gradients of the dequantized values
        shape = (*k_pool.shape[:3], q.shape[-1])
        return torch.empty_like(q), q.new_empty(shape), q.new_empty(shape), d_delta
    return torch.empty_like(q), torch.empty_like(k_pool), torch.empty_like(v_pool), d_delta


def op_gradients(saved: tuple[Tensor, ...], attrs: tuple, grad_out: Tensor | None,
                 grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients for (q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq) from the saved inputs, the
    attributes (rotary_dim, interleaved, scale, causal, window, softcap, k_scale, v_scale) and the cotangents: the
    one adjoint of every implementation.  block_delta has one where it is real-valued (a learnable delta); pools of
    codes have none."""
    q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq = saved
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    if grad_lse is None:
        grad_lse = q.new_zeros(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    dq, dk, dv, d_delta = torch.ops.gauge.rotated_query_attention_backward(
        grad_out, grad_lse, q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, *attrs)
    d_delta = d_delta.to(block_delta.dtype) if block_delta.is_floating_point() else None
    if len(attrs) > 6 and attrs[6] is not None:  # compressed pools: codes have no gradient
        dk = dv = None
    return dq, dk, dv, None, d_delta, None, None
