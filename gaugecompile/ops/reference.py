"""The definition of correct: gather the blocks, re-rotate every key by its delta, plain attention.

Slow on purpose (it materialises the whole logical view, O(L*d) per call); every fast
implementation is tested against it.  How a row of the mapping names its view tokens is
`gaugecompile.block_tables`; which keys a query sees is `masks`.
"""

from __future__ import annotations

import math

import torch

from ..block_tables import as_block_lens, check_mapping_values, view_tokens
from ..kv_format import dequantized_pools
from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate
from .checks import check_attention_inputs
from .masks import hidden_keys, soft_capped

__all__ = ["attention_one", "reference_attention", "rerotate"]


def rerotate(keys: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
             interleaved: bool) -> torch.Tensor:
    """Rotate keys [..., L, Hkv, D] by their deltas [..., L] (exact float64 angles)."""
    cdt = accumulation_dtype(keys.dtype)
    cos, sin = delta_cos_sin(deltas, inv_freq, cdt)
    return rotate(keys.to(cdt), cos[..., None, :], sin[..., None, :], rotary_dim, interleaved).to(keys.dtype)


def attention_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [H, Q, D] over k, v [L, Hkv, D] (GQA by repetition); out and lse."""
    num_heads, q_len, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
    v = v.transpose(0, 1).repeat_interleave(group, dim=0)
    scores = soft_capped((q @ k.transpose(-1, -2)) * scale, softcap)  # [H, Q, L]
    hidden = hidden_keys(q_len, k.shape[1], causal, window, q.device)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse


def reference_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    block_delta: torch.Tensor,
    seq_lens: torch.Tensor,
    rope: RopeSpec,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    impl: str = "reference",
    return_lse: bool = False,
):
    """Same contract as `rotated_query_attention`; computes in q's dtype (float64 stays float64), over the pools
    as values in that dtype (compressed ones dequantized by `kv_format.dequantize`, their one definition).

    `impl` is accepted for signature compatibility and must be "reference".
    """
    if impl != "reference":
        raise ValueError(f"impl: reference_attention only has impl='reference', got {impl!r}")
    q_len = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    block_lens = as_block_lens(seq_lens, block_table, k_pool, q_len)
    check_attention_inputs(q, k_pool, v_pool, block_table, block_delta, block_lens, rope.rotary_dim, window, softcap,
                           k_scale, v_scale)
    check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    k_pool, v_pool = dequantized_pools(k_pool, v_pool, k_scale, v_scale, q.dtype)
    outs, lses = [], []
    for b in range(q.shape[0]):
        slots, deltas = view_tokens(block_table[b], block_delta[b], block_lens[b], k_pool.shape[1])
        k = rerotate(k_pool.flatten(0, 1)[slots], deltas, rope.inv_freq, rope.rotary_dim, rope.interleaved)
        o, lse = attention_one(q[b], k, v_pool.flatten(0, 1)[slots], scale, causal, window, softcap)
        outs.append(o)
        lses.append(lse)
    out = torch.stack(outs)
    lse = torch.stack(lses).float() if q.dtype != torch.float64 else torch.stack(lses)
    return (out, lse) if return_lse else out
