"""Input validation for the rotated-query op: clear errors that name the argument.

Shape, dtype and device checks run at the op's entry (they are static under tracing); checks that
read tensor values (block ids, lengths, delta range) run in the kernels, where the values are read, so
they also guard compiled graphs and exported programs (`gaugecompile.block_tables.check_mapping_values`).
"""

from __future__ import annotations

import torch

from ..block_tables import INDEX_DTYPES
from ..kv_format import format_of

__all__ = ["check_attention_inputs"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Deltas are integers, or real numbers where deltas are learnt (`gaugecompile.rope.reduced_angles`).
_DELTAS = (*INDEX_DTYPES, torch.float32, torch.float64)


def check_attention_inputs(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    block_delta: torch.Tensor,
    block_lens: torch.Tensor,
    rotary_dim: int,
    window: int = 0,
    softcap: float = 0.0,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Raise TypeError/ValueError naming the first argument that breaks the op's contract.

    The pools may hold any KV format (`gaugecompile.kv_format`), the same for both, with their scales beside them
    where compressed; float64 queries go with float64 pools (the exact path) and only they."""
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("block_table", block_table),
                    ("block_delta", block_delta), ("block_lens", block_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q: expected [batch, num_heads, q_len, head_dim], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4:
        raise ValueError(
            f"k_pool: expected [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(k_pool.shape)}"
        )
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool: expected the shape of k_pool {tuple(k_pool.shape)}, got {tuple(v_pool.shape)}")
    batch, num_heads, q_len, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, pool_width = k_pool.shape
    if q.dtype not in _FLOATS:
        raise TypeError(f"q: expected a floating dtype {_FLOATS}, got {q.dtype}")
    fmt = format_of(k_pool, k_scale, "k_pool")
    format_of(v_pool, v_scale, "v_pool")
    if v_pool.dtype != k_pool.dtype:
        raise TypeError(f"v_pool: expected k_pool's dtype {k_pool.dtype}, got {v_pool.dtype}")
    if (q.dtype == torch.float64) != (k_pool.dtype == torch.float64):
        raise TypeError(f"k_pool: float64 queries go with float64 pools only, got {q.dtype} queries over "
                        f"{k_pool.dtype} pools")
    pool_dim = fmt.head_dim(pool_width)
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("block_table", block_table),
                    ("block_delta", block_delta), ("block_lens", block_lens)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
    if pool_dim != head_dim:
        raise ValueError(f"k_pool: head_dim {pool_dim} does not match q's head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"q: num_heads ({num_heads}) must be a multiple of k_pool's num_kv_heads ({num_kv_heads})"
        )
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected [batch={batch}, max_blocks], got shape {tuple(block_table.shape)}")
    if block_table.dtype not in INDEX_DTYPES:
        raise TypeError(f"block_table: expected an int32/int64 tensor, got {block_table.dtype}")
    if block_delta.shape != block_table.shape:
        raise ValueError(
            f"block_delta: expected the shape of block_table {tuple(block_table.shape)}, got {tuple(block_delta.shape)}"
        )
    if block_delta.dtype not in _DELTAS:
        raise TypeError(f"block_delta: expected an int32/int64 tensor (or float32/float64 for learnable offsets), "
                        f"got {block_delta.dtype}")
    if block_lens.shape != block_table.shape:
        raise ValueError(
            f"block_lens: expected the shape of block_table {tuple(block_table.shape)}, got {tuple(block_lens.shape)}"
        )
    if block_lens.dtype not in INDEX_DTYPES:
        raise TypeError(f"block_lens: expected an int32/int64 tensor, got {block_lens.dtype}")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rope.rotary_dim: expected an even number in (0, head_dim={head_dim}], got {rotary_dim}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected an int >= 0 (0: no sliding window), got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < float("inf"):
        raise ValueError(f"softcap: expected a finite number >= 0 (0: no logit soft-capping), got {softcap!r}")
