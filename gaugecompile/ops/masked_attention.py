"""`gauge::rotated_query_attention_masked`: attention over a materialised view with a mask only known at
run time, taking the rotated-query path whenever that mask is the causal one.

Schema:

    rotated_query_attention_masked(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table,
        Tensor block_delta, Tensor block_lens, Tensor inv_freq, int rotary_dim, bool interleaved,
        SymInt length, float scale, Tensor mask) -> Tensor

Meaning: `softmax(scale * q K^T + mask) V` with `K, V = materialize_kv(...)[:length]` (heads repeated
for GQA); `mask` is boolean (True = visible) or additive and broadcasts to `[batch, heads, q_len,
length]`.  The passes emit it where a mask reaches the attention as a graph input (transformers
builds it in another graph when a cache's bookkeeping breaks the frame), so its causality cannot be
proven at compile time.  At run time one elementwise pass over the mask decides: the bottom-right
causal mask (the only one a ManifoldCache view ending in the queries' own tokens has without
padding) runs `gauge::rotated_query_attention` on the untouched pool; any other mask (padding, a
window, a bias) runs the gather + re-rotate + masked attention the model wrote.  Results never
depend on which path ran beyond float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_mapping_values
from .materialize import materialize_views

__all__ = ["MASKED", "is_bottom_right_causal"]

#: Additive mask values at or below this are exact zeros after softmax in any float dtype.
MASKED = -1e30


def is_bottom_right_causal(mask: Tensor, q_len: int, kv_len: int) -> bool:
    """Whether `mask` (bool, or additive with exactly 0 for visible entries) shows key j to query i iff
    j <= i + kv_len - q_len, for every batch row and head it broadcasts over."""
    rows = torch.arange(kv_len - q_len, kv_len, device=mask.device)[:, None]
    expected = torch.arange(kv_len, device=mask.device)[None, :] <= rows
    visible = mask if mask.dtype == torch.bool else mask > MASKED
    if not bool((visible == expected).all()):
        return False
    return mask.dtype == torch.bool or bool((mask[visible] == 0).all())


def _masked_view_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor) -> Tensor:
    """Plain masked attention over a materialised view (heads repeated for GQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@torch.library.custom_op("gauge::rotated_query_attention_masked", mutates_args=())
def _masked_op(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, length: int, scale: float, mask: Tensor,
) -> Tensor:
    q_len = q.shape[2]
    check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], 0, length)
    if q_len <= length and is_bottom_right_causal(mask, q_len, length):
        out, _ = torch.ops.gauge.rotated_query_attention(q, k_pool, v_pool, block_table, block_delta, block_lens,
                                                         inv_freq, rotary_dim, interleaved, scale, q_len > 1)
        return out
    k, v = materialize_views(k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved,
                             length)
    return _masked_view_attention(q, k.to(q.dtype), v.to(q.dtype), scale, mask).contiguous()


@_masked_op.register_fake
def _masked_fake(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved, length,
                 scale, mask):
    return q.new_empty(q.shape)
