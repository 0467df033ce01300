"""`gauge::rotated_query_attention_masked`: attention over a materialised view with a mask only known at
run time, taking the rotated-query path whenever that mask is a (sliding-window) causal one.

Schema:

    rotated_query_attention_masked(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table,
        Tensor block_delta, Tensor block_lens, Tensor inv_freq, int rotary_dim, bool interleaved,
        SymInt length, float scale, Tensor mask, SymInt first=0, float softcap=0.0, Tensor? sinks=None,
        Tensor? k_scale=None, Tensor? v_scale=None) -> (Tensor out, Tensor lse)

Meaning: `softmax(cap(scale * q K^T) + mask) V` (cap: `masks.soft_capped`, the identity for softcap 0;
with `sinks` [batch, heads, q_len, 1], one more logit per row in the softmax, whose column is dropped), and
`lse` the log-sum-exp of the masked scores without the sinks (float32, float64 for float64 inputs), for models
that read it themselves (Granite's post-attention sink scaling)
with `K, V = materialize_kv(...)[first:length]` (heads repeated for GQA; compressed pools with their scales): the
view from token `first` on, as a sliding-window layer of a ManifoldCache slices it; `mask` is boolean (True =
visible) or additive and broadcasts to `[batch, heads, q_len, length - first]`.  The passes
emit it where a mask reaches the attention as a graph input (transformers builds it in another graph when a
cache's bookkeeping breaks the frame), so its structure cannot be proven at compile time.  At run time one
elementwise pass over the mask decides (`sliding_window_of`): where the keys before `first` and the mask
together are the bottom-right causal mask of the whole view, narrowed to a window of W tokens or not (the
only masks a ManifoldCache view ending in the queries' own tokens has without padding), it runs
`gauge::rotated_query_attention` with that window on the untouched pool.  A padded batch's view has entries on
the pool's last block, its padding block (`ManifoldCache` keeps it zero and never writes it): where the mask is
exactly causal over each row's other tokens (`padded_causal_lens`), those entries are emptied and the op runs on
each row's real tokens, a query that sees none of them giving 0 (as SDPA gives for a fully masked query).  Any
other mask (a bias, a window over padding) runs the gather + re-rotate + masked attention the model wrote.
Results never depend on which path ran beyond float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..block_tables import check_mapping_values, view_entries
from ..rope import accumulation_dtype
from .counters import runs
from .masks import hidden_keys, soft_capped
from .materialize import materialize_views

__all__ = ["MASKED", "sliding_window_of", "padded_causal_lens"]

#: Additive mask values at or below this are exact zeros after softmax in any float dtype.
MASKED = -1e30


def sliding_window_of(mask: Tensor, q_len: int, length: int, first: int = 0) -> int | None:
    """The window W (0: none) for which `mask` over view keys [first, length), with the keys before `first`
    hidden, is the op's mask (`masks.hidden_keys`): bottom-right causal, each query seeing its last W tokens;
    or None when it is no such mask.  `mask` is bool, or additive with exactly 0 for visible entries, and
    broadcasts over batch rows and heads.

    W is read from the last query, which sees min(W, length) keys; every entry is then compared with the
    pattern, so a mask that only looks windowed in its last row is refused.
    """
    visible = mask if mask.dtype == torch.bool else mask > MASKED
    try:
        visible = visible.broadcast_to((*visible.shape[:-2], q_len, length - first))
    except RuntimeError:
        return None
    seen = int(visible[..., -1, :].sum(-1).amax()) if visible.numel() else 0
    window = seen if seen < length else 0
    hidden = hidden_keys(q_len, length, q_len > 1, window, mask.device)
    expected = torch.ones(q_len, length, dtype=torch.bool, device=mask.device) if hidden is None else ~hidden
    if bool(expected[:, :first].any()) or not bool((visible == expected[:, first:]).all()):
        return None
    return window if mask.dtype == torch.bool or bool((torch.where(visible, mask, 0) == 0).all()) else None


def _visible(mask: Tensor) -> Tensor:
    """Where an additive or boolean mask lets a query see a key."""
    return mask if mask.dtype == torch.bool else mask > MASKED


def padded_causal_lens(mask: Tensor, block_table: Tensor, block_lens: Tensor, q_len: int, length: int,
                       pad_block: int) -> tuple[Tensor, Tensor] | None:
    """The table's token counts with its padding entries (those on `pad_block`) emptied, and each row's number of
    trailing real queries, when `mask` is exactly the causal mask over the real columns; else None (also for a view
    without padding entries).

    The trailing real queries of a row holding n real tokens see, query t, the first n - q_len + t + 1 of them; the
    queries before them (padding) all see the real tokens before the new ones: what a causal mask over real columns
    gives wherever the padding lies (left, right, between a row's cached tokens and its new ones) -- what the op
    computes over the emptied table (`_padded_attention`).  Every mask entry is compared, so a bias, a window or
    padding other than the table's is refused; additive masks must be 0 where visible."""
    entry, _ = view_entries(block_lens, length)
    real = block_table.to(torch.int64).gather(1, entry) != pad_block  # [B, L]
    if bool(real.all()):
        return None
    rank = real.cumsum(1) - 1  # the index of each real column among the row's real tokens
    held = real.sum(1, keepdim=True)  # [B, 1]
    tail = real[:, length - q_len:].flip(1).to(torch.int64).cumprod(1).sum(1, keepdim=True)  # trailing real queries
    t = torch.arange(q_len, device=real.device)[None, :]
    last = torch.where(t >= q_len - tail, held - q_len + t, held - tail - 1)  # [B, Q]: the last rank each sees
    expected = (real[:, None, :] & (rank[:, None, :] <= last[:, :, None]))[:, None]  # [B, 1, Q, L]
    visible = _visible(mask)
    try:
        torch.broadcast_shapes(visible.shape, expected.shape)
    except RuntimeError:
        return None
    if not bool((visible == expected).all()):
        return None
    if mask.dtype != torch.bool and not bool((torch.where(visible, mask, 0) == 0).all()):
        return None
    return torch.where(block_table == pad_block, 0, block_lens), tail[:, 0]


def _padded_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor,
                      block_lens: Tensor, tail: Tensor, inv_freq: Tensor, rotary_dim: int, interleaved: bool,
                      scale: float, softcap: float, k_scale: Tensor | None, v_scale: Tensor | None
                      ) -> tuple[Tensor, Tensor]:
    """The op over rows of their own lengths (`block_lens` without padding), as `padded_causal_lens` defines it: rows
    whose queries are all real in one call; in a row with `tail` < q_len real queries, those run causally over its
    view and the padding queries before them non-causally over the tokens before its new ones (0 if none)."""
    q_len = q.shape[2]
    held = block_lens.sum(1)
    rows = torch.nonzero(tail == q_len).flatten()
    call = lambda q, table, delta, lens, causal: torch.ops.gauge.rotated_query_attention(  # noqa: E731
        q, k_pool, v_pool, table, delta, lens, inv_freq, rotary_dim, interleaved, scale, causal, 0, softcap, k_scale,
        v_scale)
    if len(rows) == q.shape[0]:
        return call(q, block_table, block_delta, block_lens, q_len > 1)
    out = q.new_zeros(q.shape)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    if len(rows):
        out[rows], lse[rows] = call(q[rows], block_table[rows], block_delta[rows], block_lens[rows], q_len > 1)
    for row in torch.nonzero(tail < q_len).flatten().tolist():
        k, n = int(tail[row]), int(held[row])
        table, delta, lens = block_table[row:row + 1], block_delta[row:row + 1], block_lens[row:row + 1]
        if k:
            out[row, :, q_len - k:], lse[row, :, q_len - k:] = (x[0] for x in call(q[row:row + 1, :, q_len - k:],
                                                                                  table, delta, lens, k > 1))
        if n > k:  # the padding queries see the tokens before the new ones (whole entries: padding cut there),
            m = q_len - k  # each a row of one query, so that the view may hold fewer tokens than there are queries
            before = (lens * ((lens.cumsum(1) <= n - k) & (lens > 0))).expand(m, -1).contiguous()
            o, s = call(q[row, :, :m].transpose(0, 1)[:, :, None], table.expand(m, -1).contiguous(),
                        delta.expand(m, -1).contiguous(), before, False)
            out[row, :, :m], lse[row, :, :m] = o[:, :, 0].transpose(0, 1), s[:, :, 0].transpose(0, 1)
    return out, lse


def _masked_view_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor, softcap: float,
                           sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """Plain masked attention over a materialised view (heads repeated for GQA), the scores soft-capped first, a
    sink column (if any) in the softmax; out and the log-sum-exp of the masked scores."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = soft_capped(q @ k.transpose(-1, -2) * scale, softcap)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(q.dtype)
    lse = torch.logsumexp(scores, -1).to(accumulation_dtype(q.dtype))
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], -1)
    seen = (scores > float("-inf")).any(-1, keepdim=True)  # a query that sees no key gives 0, as SDPA does
    probs = torch.softmax(scores.masked_fill(~seen, 0), -1) * seen
    return (probs[..., : k.shape[2]] @ v).contiguous(), lse


@torch.library.custom_op("gauge::rotated_query_attention_masked", mutates_args=())
def _masked_op(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, length: int, scale: float, mask: Tensor, first: int = 0,
    softcap: float = 0.0, sinks: Tensor | None = None, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    q_len = q.shape[2]
    check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], 0, length)
    if not 0 <= first <= length:
        raise ValueError(f"first: expected the first key in [0, length={length}], got {first}")
    window = sliding_window_of(mask, q_len, length, first) if q_len <= length else None
    padded = None if window is not None or first else padded_causal_lens(mask, block_table, block_lens, q_len,
                                                                         length, k_pool.shape[0] - 1)
    if window is not None or padded is not None:
        if padded is None:
            out, lse = torch.ops.gauge.rotated_query_attention(q, k_pool, v_pool, block_table, block_delta,
                                                               block_lens, inv_freq, rotary_dim, interleaved, scale,
                                                               q_len > 1, window, softcap, k_scale, v_scale)
        else:
            out, lse = _padded_attention(q, k_pool, v_pool, block_table, block_delta, *padded, inv_freq,
                                         rotary_dim, interleaved, scale, softcap, k_scale, v_scale)
        if sinks is None:
            return out, lse
        # a sink adds exp(sink) to the denominator: out * exp(lse) / (exp(lse) + exp(sink))
        weight = torch.sigmoid(lse - sinks[..., 0].to(lse.dtype))
        return (out * weight[..., None].to(out.dtype)).contiguous(), lse
    runs["masked_fallback"] += 1
    k, v = materialize_views(k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved,
                             length, k_scale, v_scale, q.dtype)
    return _masked_view_attention(q, k[:, :, first:], v[:, :, first:], scale, mask, softcap, sinks)


@_masked_op.register_fake
def _masked_fake(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved, length,
                 scale, mask, first=0, softcap=0.0, sinks=None, k_scale=None, v_scale=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
