"""The definition of correct: gather the blocks, re-rotate every key by its delta, plain attention.

Slow on purpose (it materialises the whole logical view, O(L*d) per call); every fast
implementation is tested against it.
"""

from __future__ import annotations

import math

import torch

from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate


def token_slots(block_table: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Flat pool slot (block * block_size + offset) of each of the first `length` view tokens: [..., length]."""
    n_blocks = -(-length // block_size)
    ids = block_table[..., :n_blocks].long()
    offsets = torch.arange(block_size, device=block_table.device)
    return (ids[..., None] * block_size + offsets).flatten(-2)[..., :length]


def token_deltas(block_delta: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """The delta of each of the first `length` view tokens (its block's delta): [..., length]."""
    n_blocks = -(-length // block_size)
    return block_delta[..., :n_blocks].repeat_interleave(block_size, dim=-1)[..., :length]


def gather_view(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of each view: [..., length, num_kv_heads, head_dim] for a [..., max_blocks] table."""
    return pool.flatten(0, 1)[token_slots(block_table, pool.shape[1], length)]


def rerotate_view(
    keys: torch.Tensor, block_delta: torch.Tensor, block_size: int, inv_freq: torch.Tensor,
    rotary_dim: int, interleaved: bool,
) -> torch.Tensor:
    """Rotate each gathered key [..., L, Hkv, D] by the delta of its block (float64 angles)."""
    token_delta = token_deltas(block_delta, block_size, keys.shape[-3])
    cdt = accumulation_dtype(keys.dtype)
    cos, sin = delta_cos_sin(token_delta, inv_freq, cdt)
    return rotate(keys.to(cdt), cos[..., None, :], sin[..., None, :], rotary_dim, interleaved).to(keys.dtype)


def attention_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [H, Q, D] over k, v [L, Hkv, D] (GQA by repetition); out and lse."""
    num_heads, q_len, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
    v = v.transpose(0, 1).repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(-1, -2)) * scale  # [H, Q, L]
    if causal:
        length = k.shape[1]
        qpos = torch.arange(length - q_len, length, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
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
    impl: str = "reference",
    return_lse: bool = False,
):
    """Same contract as `rotated_query_attention`; computes in q's dtype (float64 stays float64).

    `impl` is accepted for signature compatibility and must be "reference".
    """
    from .checks import check_attention_inputs, check_mapping_values

    if impl != "reference":
        raise ValueError(f"impl: reference_attention only has impl='reference', got {impl!r}")
    check_attention_inputs(q, k_pool, v_pool, block_table, block_delta, seq_lens, rope.rotary_dim)
    check_mapping_values(block_table, block_delta, seq_lens, k_pool.shape[0], k_pool.shape[1], q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_size = k_pool.shape[1]
    outs, lses = [], []
    for b in range(q.shape[0]):
        length = int(seq_lens[b])
        k = rerotate_view(gather_view(k_pool, block_table[b], length), block_delta[b], block_size,
                          rope.inv_freq, rope.rotary_dim, rope.interleaved)
        v = gather_view(v_pool, block_table[b], length)
        o, lse = attention_one(q[b], k, v, scale, causal)
        outs.append(o)
        lses.append(lse)
    out = torch.stack(outs)
    lse = torch.stack(lses).float() if q.dtype != torch.float64 else torch.stack(lses)
    return (out, lse) if return_lse else out
