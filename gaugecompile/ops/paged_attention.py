"""Rotated-query attention on plain torch ops: a paged loop that never materialises the view.

Design.  Each sequence's logical view is walked in tiles of consecutive table entries (about
`TILE_TOKENS` tokens; entry j holds slots [0, block_lens[j]) of its block).  Rows of equal length whose
leading entries are the same physical blocks with the same deltas and counts (beams and samples over one
prompt) read those blocks once for all of them, their
queries stacked as extra rows (cascade attention); each row then goes on alone over the rest of its
view.  A tile whose physical blocks are consecutive in the pool is read as a *view* of the pool (no
copy); a fragmented tile is read with one `index_select` into a bounded scratch of at most one tile.
Keys are never re-rotated: the query is rotated instead, by R(-delta) once per tile when the tile's
blocks share a delta (the common case: identity mappings, shared prefixes, shifted windows; not at
all for delta 0), else once per block -- O(blocks * head_dim) extra work, against O(tokens *
head_dim) for re-rotating keys.  Tiles are merged by an online softmax (running max, running sum,
rescaled accumulator), so the result is that of one softmax over the whole view and the
log-sum-exp comes out for free.  GQA is handled by folding the query-head group into the query
rows, so K/V heads are never repeated.  With a sliding window, tiles that hold no key any query sees are
skipped unread.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..block_tables import check_mapping_values
from ..kv_format import dequantize
from ..rope import accumulation_dtype, block_angles, rotate
from .masks import hidden_at, soft_capped

TILE_TOKENS = 4096


MIN_VIEW_BLOCKS = 8


def _runs(table: list[int], deltas: list[int], lens: list[int], block_size: int,
          tile_blocks: int) -> list[tuple[int, int]]:
    """Split entries [0, n) into tiles of at most `tile_blocks` entries.

    A run of >= MIN_VIEW_BLOCKS full blocks that are physically consecutive with one delta (its last block may
    be partial) becomes its own tile (read as a view, query rotated once); shorter irregular stretches are
    grouped into gathered tiles so that a fragmented table costs a few large tiles, not one tiny tile per block.
    """
    n = len(table)
    regular = [j + 1 < n and table[j + 1] == table[j] + 1 and deltas[j + 1] == deltas[j] and lens[j] == block_size
               for j in range(n)]
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


def tile_kv(pool: torch.Tensor, scale: torch.Tensor | None, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Blocks `ids` of the pool as values [n, block_size, Hkv, D] in `dtype` (read as a view when consecutive, else
    gathered; compressed blocks dequantized with their scales)."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        blocks = slice(ids[0], ids[0] + len(ids))
        return dequantize(pool[blocks], None if scale is None else scale[blocks], dtype)
    index = torch.tensor(ids, device=pool.device)
    return dequantize(pool.index_select(0, index), None if scale is None else scale.index_select(0, index), dtype)


class _Softmax:
    """Online-softmax state of query rows [Hkv, R(, D)]: running max, sum and weighted values."""

    def __init__(self) -> None:
        self.m = self.l_sum = self.acc = None

    def add(self, s: torch.Tensor, v: torch.Tensor) -> None:
        """Fold in scores s [Hkv, R, T] (masked entries -inf) of values v [Hkv, T, D]."""
        m_tile = s.amax(dim=-1)
        m_new = m_tile if self.m is None else torch.maximum(self.m, m_tile)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe[..., None])
        pv, p_sum = torch.matmul(p, v), p.sum(dim=-1)
        if self.m is None:  # the first tile: nothing to rescale
            self.acc, self.l_sum = pv, p_sum
        else:
            alpha = torch.exp(self.m - m_safe)
            self.acc = self.acc * alpha[..., None] + pv
            self.l_sum = self.l_sum * alpha + p_sum
        self.m = m_new

    def result(self, rows: int, head_dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out [Hkv, rows, D] and lse [Hkv, rows]; with no key seen (an empty view) 0/0 and log 0: NaN and -inf."""
        if self.m is None:
            num_kv = like.shape[0]
            return (like.new_full((num_kv, rows, head_dim), float("nan")),
                    like.new_full((num_kv, rows), float("-inf")))
        return self.acc / self.l_sum[..., None], self.m + torch.log(self.l_sum)

    def rows(self, start: int, end: int) -> _Softmax:
        """The state of rows [start, end) (a view, so a row can continue alone)."""
        part = _Softmax()
        if self.m is not None:
            part.m, part.l_sum, part.acc = self.m[:, start:end], self.l_sum[:, start:end], self.acc[:, start:end]
        return part


class Pools(NamedTuple):
    """The pools a view reads, with their scales (None for float formats)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


def _attend(
    state: _Softmax, qg: torch.Tensor, row_pos: torch.Tensor | None, pools: Pools,
    table: list[int], deltas: list[int], lens: list[int], cos: torch.Tensor | None, sin: torch.Tensor | None,
    first: int, end: int, rotary_dim: int, interleaved: bool, scale: float, causal: bool, window: int,
    softcap: float,
) -> None:
    """Fold entries [first, end) of a view into `state`, for queries qg [Hkv, R, D] whose view positions are
    row_pos [R] (None unless causal or windowed).  table/deltas/lens/cos/sin are indexed by entry; cos/sin may
    be None when every delta is 0."""
    block_size = pools.k.shape[1]
    cdt = qg.dtype
    tile_blocks = max(1, TILE_TOKENS // block_size)
    tok0 = sum(lens[:first])
    if window:  # entries wholly at or before the last position every query's window hides are not read
        last_hidden = int(row_pos.min()) - window
        while first < end and tok0 + lens[first] - 1 <= last_hidden:
            tok0 += lens[first]
            first += 1
    for r0, r1 in _runs(table[first:end], deltas[first:end], lens[first:end], block_size, tile_blocks):
        j0, j1 = first + r0, first + r1
        counts = lens[j0:j1]
        n_tok = sum(counts)
        if n_tok == 0:
            continue
        if all(n == block_size for n in counts[:-1]):  # the tile's tokens are its first n_tok slots
            held = slice(0, n_tok)
        else:
            mask = torch.arange(block_size)[None, :] < torch.tensor(counts)[:, None]
            held = mask.flatten().nonzero().squeeze(1).to(qg.device)
        kb = tile_kv(pools.k, pools.k_scale, table[j0:j1], cdt)  # [n, bs, Hkv, D]
        vb = tile_kv(pools.v, pools.v_scale, table[j0:j1], cdt)
        if all(d == deltas[j0] for d in deltas[j0:j1]):
            qr = qg if deltas[j0] == 0 else rotate(qg, cos[j0], -sin[j0], rotary_dim, interleaved)  # [Hkv, R, D]
            s = torch.matmul(qr, kb.flatten(0, 1)[held].permute(1, 2, 0))  # [Hkv, R, T]
        else:
            qr = rotate(qg.unsqueeze(0), cos[j0:j1, None, None], -sin[j0:j1, None, None], rotary_dim, interleaved)
            s = torch.einsum("nhqd,nshd->hqns", qr, kb).flatten(2)[..., held]
        s = soft_capped(s * scale, softcap)
        if causal or window:
            key_pos = torch.arange(tok0, tok0 + n_tok, device=qg.device)
            s = s.masked_fill(hidden_at(row_pos[None, :, None], key_pos[None, None, :], causal, window),
                              float("-inf"))
        state.add(s, vb.flatten(0, 1)[held].transpose(0, 1))
        tok0 += n_tok


def _shared_blocks(tables: list[list[int]], deltas: list[list[int]], lens: list[list[int]], n_blocks: int) -> int:
    """How many leading entries all rows map to the same physical block with the same delta and count."""
    shared = 0
    while shared < n_blocks and all(t[shared] == tables[0][shared] and d[shared] == deltas[0][shared]
                                    and n[shared] == lens[0][shared]
                                    for t, d, n in zip(tables, deltas, lens, strict=True)):
        shared += 1
    return shared


def _entries(lens: list[int]) -> int:
    """Entries up to the last one holding tokens."""
    return next((j + 1 for j in range(len(lens) - 1, -1, -1) if lens[j]), 0)


def _row(t: torch.Tensor | None, r: int) -> torch.Tensor | None:
    return None if t is None else t[r]


def _group(
    q: torch.Tensor, pools: Pools, tables: list[list[int]], deltas: list[list[int]],
    lens: list[list[int]], cos: torch.Tensor, sin: torch.Tensor, length: int, rotary_dim: int, interleaved: bool,
    scale: float, causal: bool, window: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one view length: q [b, H, Q, D] (compute dtype) -> out [b, H, Q, D], lse [b, H, Q].

    Their common leading entries are read once with all rows' queries stacked; then each row goes on alone.
    cos/sin are [b, max_blocks, F], or None when every delta is 0.
    """
    rows, num_heads, q_len, head_dim = q.shape
    num_kv = pools.k.shape[2]
    group = num_heads // num_kv
    n_blocks = [_entries(n) for n in lens]
    per_row = group * q_len
    # [b, H, Q, D] -> [Hkv, b * G * Q, D]: query rows grouped by KV head, rows of one sequence contiguous
    qg = q.reshape(rows, num_kv, per_row, head_dim).transpose(0, 1).reshape(num_kv, rows * per_row, head_dim)
    masked = causal or window > 0
    row_pos = torch.arange(length - q_len, length, device=q.device).repeat(group) if masked else None  # per row
    shared = _shared_blocks(tables, deltas, lens, min(n_blocks)) if rows > 1 else n_blocks[0]
    state = _Softmax()
    _attend(state, qg, row_pos.repeat(rows) if masked else None, pools, tables[0], deltas[0], lens[0],
            _row(cos, 0), _row(sin, 0), 0, shared, rotary_dim, interleaved, scale, causal, window, softcap)
    outs, lses = [], []
    for r in range(rows):
        mine = state.rows(r * per_row, (r + 1) * per_row)
        _attend(mine, qg[:, r * per_row : (r + 1) * per_row], row_pos, pools, tables[r], deltas[r], lens[r],
                _row(cos, r), _row(sin, r), shared, n_blocks[r], rotary_dim, interleaved, scale, causal, window,
                softcap)
        out, lse = mine.result(per_row, head_dim, qg)
        outs.append(out.reshape(num_heads, q_len, head_dim))
        lses.append(lse.reshape(num_heads, q_len))
    return torch.stack(outs), torch.stack(lses)


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
    block_delta: torch.Tensor, block_lens: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
    interleaved: bool, scale: float, causal: bool, window: int = 0, softcap: float = 0.0,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated-query attention for a batch (shape-checked inputs, pools of any KV format); out in q's dtype, lse
    float32/64."""
    cdt = accumulation_dtype(q.dtype)
    pools = Pools(k_pool, v_pool, k_scale, v_scale)
    check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], q.shape[2])
    cos, sin = block_angles(block_delta, inv_freq, cdt)  # [B, width, F], once for every row and layer
    tables, deltas, lens = block_table.tolist(), block_delta.tolist(), block_lens.tolist()
    totals = [sum(n) for n in lens]
    groups = sorted(set(totals))
    if len(groups) == 1:  # ManifoldCache's case: one view length for the whole batch
        out, lse = _group(q.to(cdt), pools, tables, deltas, lens, cos, sin, groups[0], rotary_dim,
                          interleaved, scale, causal, window, softcap)
        return out.to(q.dtype), lse
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=cdt, device=q.device)
    for length in groups:
        idx = [b for b, n in enumerate(totals) if n == length]
        o, l_ = _group(q[idx].to(cdt), pools, [tables[b] for b in idx], [deltas[b] for b in idx],
                       [lens[b] for b in idx], None if cos is None else cos[idx], None if sin is None else sin[idx],
                       length, rotary_dim, interleaved, scale, causal, window, softcap)
        out[idx], lse[idx] = o.to(q.dtype), l_
    return out, lse
