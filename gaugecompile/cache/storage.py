"""The physical KV pools of every layer, the stored position of every slot, and block copies.

Pools are written once per token (`write`) and never moved; the only other writes are
copy-on-write block copies (`copy_blocks`): the tokens of a block an edit splits, copied as they
are (they keep their sigma), and a row's partial last block taking new tokens at another sigma,
re-rotated so that a block keeps a single sigma.  Stored positions live on the host (int64 per
slot): the planner reads them to find where an edit cuts a block, and a copy records the new stored
positions of its slots.
"""

from __future__ import annotations

import numpy as np
import torch

from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate
from .mapping import NewBlock

__all__ = ["BlockStorage"]


class BlockStorage:
    """Per-layer `k_pool`/`v_pool` of shape [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        rope: RopeSpec, dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.stored = np.zeros((num_blocks, block_size), dtype=np.int64)
        self.block_size = block_size
        self.rope = rope
        self.device = torch.device(device)

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block over all layers (keys and values)."""
        k = self.k_pools[0]
        return 2 * len(self.k_pools) * k[0].numel() * k.element_size()

    def copy_blocks(self, targets: list[tuple[int, NewBlock]]) -> None:
        """Fill each target block `dst` with its sources' slots, keys re-rotated by (source shift - block sigma)."""
        if not targets:
            return
        src, dst, rot = [], [], []
        bs = self.block_size
        for phys, blk in targets:
            off = 0
            for p in blk.sources:
                n = p.b - p.a
                src.extend(range(p.phys * bs + p.a, p.phys * bs + p.b))
                dst.extend(range(phys * bs + off, phys * bs + off + n))
                rot.extend([p.shift - blk.sigma] * n)
                self.stored[phys, off:off + n] = self.stored[p.phys, p.a:p.b] + p.shift - blk.sigma
                off += n
        src_t = torch.tensor(src, device=self.device)
        dst_t = torch.tensor(dst, device=self.device)
        rotated = any(rot)  # the copies of split blocks keep their sigma: a plain copy
        if rotated:
            rot_t = torch.tensor(rot, device=self.device)
            cdt = accumulation_dtype(self.k_pools[0].dtype)
            cos, sin = delta_cos_sin(rot_t, self.rope.inv_freq, cdt)
        for k_pool, v_pool in zip(self.k_pools, self.v_pools, strict=True):
            k_flat, v_flat = k_pool.view(-1, *k_pool.shape[2:]), v_pool.view(-1, *v_pool.shape[2:])
            k = k_flat[src_t]
            if rotated:
                k = rotate(k.to(cdt), cos[:, None], sin[:, None], self.rope.rotary_dim, self.rope.interleaved)
            k_flat[dst_t] = k.to(k_flat.dtype)
            v_flat[dst_t] = v_flat[src_t]
