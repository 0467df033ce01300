"""The definition of correct: gather the blocks, re-rotate every key by its delta, plain attention.

Slow on purpose (it materialises the whole logical view, O(L*d) per call); every fast
implementation is tested against it.

The mapping of one sequence is a row of three tables: entry j of its view is slots
[0, block_lens[j]) of physical block block_table[j], rotated by block_delta[j].  Its view is the
concatenation of its entries in order; entries holding 0 tokens are never read.  A plain paged
cache (every block full but the last) is `full_block_lens(seq_lens, ...)`.
"""

from __future__ import annotations

import math

import torch

from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate


def full_block_lens(seq_lens: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    """Tokens per entry [batch, width] of views of `seq_lens` tokens whose blocks are full but the last."""
    start = torch.arange(width, device=seq_lens.device) * block_size
    return (seq_lens.to(torch.int64)[:, None] - start[None, :]).clamp(0, block_size)


def view_tokens(
    block_table: torch.Tensor, block_delta: torch.Tensor, block_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's view token by token: the flat pool slot (block * block_size + offset) and the delta of each
    (int64, or the real deltas' own dtype, so a learnable offset keeps its gradient)."""
    offsets = torch.arange(block_size, device=block_table.device)
    held = offsets[None, :] < block_lens.to(torch.int64)[:, None]  # [width, block_size]
    slots = block_table.to(torch.int64)[:, None] * block_size + offsets[None, :]
    return slots[held], as_deltas(block_delta)[:, None].expand(-1, block_size)[held]


def as_deltas(block_delta: torch.Tensor) -> torch.Tensor:
    """Deltas as the angle code takes them: integers as int64, real (learnable) offsets as float64."""
    return block_delta.to(torch.float64 if block_delta.is_floating_point() else torch.int64)


def rerotate(keys: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
             interleaved: bool) -> torch.Tensor:
    """Rotate keys [..., L, Hkv, D] by their deltas [..., L] (exact float64 angles)."""
    cdt = accumulation_dtype(keys.dtype)
    cos, sin = delta_cos_sin(deltas, inv_freq, cdt)
    return rotate(keys.to(cdt), cos[..., None, :], sin[..., None, :], rotary_dim, interleaved).to(keys.dtype)


def hidden_keys(q_len: int, length: int, causal: bool, window: int, device: torch.device) -> torch.Tensor | None:
    """[Q, L] True where a query cannot see a key, or None when every query sees every key.

    Query t sits at view position p = length - q_len + t (the view ends with the queries' own tokens).  `causal`
    hides the keys after p (bottom-right); a sliding `window` W > 0 hides the keys at p - W and before, so each
    query sees at most its last W tokens, itself included -- transformers' sliding-window attention.
    """
    if not causal and not window:
        return None
    return hidden_at(torch.arange(length - q_len, length, device=device)[:, None],
                     torch.arange(length, device=device)[None, :], causal, window)


def hidden_at(query_pos: torch.Tensor, key_pos: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """True where a query at view position `query_pos` cannot see a key at `key_pos` (broadcast together): the
    rule of `hidden_keys` for any positions, as a kernel that walks the view in tiles needs it."""
    hidden = key_pos > query_pos if causal else torch.zeros(torch.broadcast_shapes(query_pos.shape, key_pos.shape),
                                                             dtype=torch.bool, device=key_pos.device)
    return hidden | (key_pos <= query_pos - window) if window else hidden


def soft_capped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): `softcap * tanh(scores / softcap)`, or the scores as they are for 0."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores


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
    impl: str = "reference",
    return_lse: bool = False,
):
    """Same contract as `rotated_query_attention`; computes in q's dtype (float64 stays float64).

    `impl` is accepted for signature compatibility and must be "reference".
    """
    from .checks import as_block_lens, check_attention_inputs, check_mapping_values

    if impl != "reference":
        raise ValueError(f"impl: reference_attention only has impl='reference', got {impl!r}")
    q_len = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    block_lens = as_block_lens(seq_lens, block_table, k_pool, q_len)
    check_attention_inputs(q, k_pool, v_pool, block_table, block_delta, block_lens, rope.rotary_dim, window, softcap)
    check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
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
