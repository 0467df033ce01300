"""Rotated-query attention on plain torch ops: a paged loop that never materialises the view.

Design.  Each sequence's logical view is walked in tiles of consecutive logical blocks (about
`TILE_TOKENS` tokens).  A tile whose physical blocks are consecutive in the pool is read as a
*view* of the pool (no copy); a fragmented tile is read with one `index_select` into a bounded
scratch of at most one tile.  Keys are never re-rotated: the query is rotated instead, by
R(-delta) once per tile when the tile's blocks share a delta (the common case: identity mappings,
shared prefixes, shifted windows), else once per block -- O(blocks * head_dim) extra work, against
O(tokens * head_dim) for re-rotating keys.  Tiles are merged by an online softmax (running max,
running sum, rescaled accumulator), so the result is that of one softmax over the whole view and
the log-sum-exp comes out for free.  GQA is handled by folding the query-head group into the query
rows, so K/V heads are never repeated.
"""

from __future__ import annotations

import torch

from .rope import delta_cos_sin, rotate

TILE_TOKENS = 4096


MIN_VIEW_BLOCKS = 8


def _runs(table: list[int], deltas: list[int], tile_blocks: int) -> list[tuple[int, int]]:
    """Split logical blocks [0, n) into tiles of at most `tile_blocks` blocks.

    A run of >= MIN_VIEW_BLOCKS blocks that are physically consecutive with one delta becomes its own
    tile (read as a view, query rotated once); shorter irregular stretches are grouped into gathered
    tiles so that a fragmented table costs a few large tiles, not one tiny tile per block.
    """
    n = len(table)
    regular = [j + 1 < n and table[j + 1] == table[j] + 1 and deltas[j + 1] == deltas[j] for j in range(n)]
    run_end = list(range(1, n + 1))  # exclusive end of the regular run starting at j
    for j in range(n - 2, -1, -1):
        if regular[j]:
            run_end[j] = run_end[j + 1]
    tiles, j = [], 0
    while j < n:
        if run_end[j] - j >= MIN_VIEW_BLOCKS:
            end = min(run_end[j], j + tile_blocks)
        else:
            end = j + 1
            while end < n and end - j < tile_blocks and run_end[end] - end < MIN_VIEW_BLOCKS:
                end += 1
        tiles.append((j, end))
        j = end
    return tiles


def _tile_kv(pool: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Blocks `ids` of the pool as [n, block_size, Hkv, D]: a view when consecutive, else a copy."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return pool[ids[0] : ids[0] + len(ids)]
    return pool.index_select(0, torch.tensor(ids, device=pool.device))


def _sequence(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: list[int], deltas: torch.Tensor,
    length: int, inv_freq: torch.Tensor, rotary_dim: int, interleaved: bool, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [H, Q, D] -> out [H, Q, D] (compute dtype), lse [H, Q]."""
    num_heads, q_len, head_dim = q.shape
    _, block_size, num_kv, _ = k_pool.shape
    group = num_heads // num_kv
    cdt = q.dtype
    # Query rows grouped by KV head: [Hkv, G*Q, D]
    qg = q.reshape(num_kv, group * q_len, head_dim)
    cos, sin = delta_cos_sin(deltas, inv_freq, cdt)  # [n_blocks, F]
    delta_list = deltas.tolist()
    row_pos = torch.arange(length - q_len, length, device=q.device).repeat(group)  # view index per row

    m = torch.full((num_kv, group * q_len), float("-inf"), dtype=cdt, device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros((num_kv, group * q_len, head_dim), dtype=cdt, device=q.device)
    tile_blocks = max(1, TILE_TOKENS // block_size)
    for j0, j1 in _runs(table, delta_list, tile_blocks):
        tok0 = j0 * block_size
        n_tok = min(j1 * block_size, length) - tok0
        if causal and tok0 > length - 1:
            break
        kb = _tile_kv(k_pool, table[j0:j1]).to(cdt)  # [n, bs, Hkv, D]
        vb = _tile_kv(v_pool, table[j0:j1]).to(cdt)
        if all(d == delta_list[j0] for d in delta_list[j0:j1]):
            qr = rotate(qg, cos[j0], -sin[j0], rotary_dim, interleaved)  # [Hkv, GQ, D]
            k = kb.flatten(0, 1)[:n_tok]  # [T, Hkv, D]
            s = torch.matmul(qr, k.permute(1, 2, 0))  # [Hkv, GQ, T]
        else:
            qr = rotate(qg.unsqueeze(0), cos[j0:j1, None, None], -sin[j0:j1, None, None], rotary_dim, interleaved)
            s = torch.einsum("nhqd,nshd->hqns", qr, kb).flatten(2)[..., :n_tok]
        s = s * scale
        if causal:
            key_pos = torch.arange(tok0, tok0 + n_tok, device=q.device)
            s = s.masked_fill(key_pos[None, None, :] > row_pos[None, :, None], float("-inf"))
        m_tile = s.amax(dim=-1)
        m_new = torch.maximum(m, m_tile)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        v = vb.flatten(0, 1)[:n_tok]  # [T, Hkv, D]
        acc = acc * alpha[..., None] + torch.matmul(p, v.transpose(0, 1))
        l_sum = l_sum * alpha + p.sum(dim=-1)
        m = m_new
    out = acc / l_sum[..., None]
    lse = m + torch.log(l_sum)
    return out.reshape(num_heads, q_len, head_dim), lse.reshape(num_heads, q_len)


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
    block_delta: torch.Tensor, seq_lens: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
    interleaved: bool, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated-query attention for a batch (validated inputs); out in q's dtype, lse float32/64."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    block_size = k_pool.shape[1]
    lens = seq_lens.tolist()
    outs, lses = [], []
    for b, length in enumerate(lens):
        n_blocks = -(-length // block_size)
        o, lse = _sequence(
            q[b].to(cdt), k_pool, v_pool, block_table[b, :n_blocks].tolist(), block_delta[b, :n_blocks],
            length, inv_freq, rotary_dim, interleaved, scale, causal,
        )
        outs.append(o.to(q.dtype))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)
