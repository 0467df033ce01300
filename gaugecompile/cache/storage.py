"""The physical KV pools of every layer, the stored position of every slot, and block copies.

Pools are written once per token (`write`) and never moved; the only other writes are
copy-on-write block copies (`copy_blocks`): the tokens of a block an edit splits, copied as they
are (they keep their delta), and a row's partial last block taking new tokens at another delta,
re-rotated so that a block keeps a single delta.  Stored positions live on the host (int64 per
slot): the planner reads them to find where an edit cuts a block, and a copy records the new stored
positions of its slots.

Two more blocks follow the allocator's: `trash_block`, where a padded forward writes its padding tokens
(never read), and `pad_block`, all zeros and never written, which a padded forward's tables point at for
padding columns (`padding.py`): the materialised view reads zeros there, under the mask.

A layer's pools are allocated by its first write, shaped by the keys and values the model hands it,
not by its config: a tensor-parallel rank holds only its share of the KV heads, and a model may
ignore a config attribute.  Until then the layer holds no tokens, so nothing is lost by waiting.
"""

from __future__ import annotations

import numpy as np
import torch

from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate
from .mapping import NewBlock

__all__ = ["BlockStorage"]


class BlockStorage:
    """Per-layer `k_pool`/`v_pool` of shape [num_blocks + 2, block_size, kv_heads, head_dim] (the allocator's blocks,
    then `trash_block` and `pad_block`); None until the layer's first write (`allocate`) sizes them."""

    def __init__(
        self, ropes: tuple[RopeSpec, ...], num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.k_pools: list[torch.Tensor | None] = [None] * len(ropes)
        self.v_pools: list[torch.Tensor | None] = [None] * len(ropes)
        self.stored = np.zeros((num_blocks, block_size), dtype=np.int64)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ropes = ropes  # per layer: a copy re-rotates keys in its layer's basis (NoPE layers: never)
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def trash_block(self) -> int:
        """The block a padded forward's padding tokens are written to (never read)."""
        return self.num_blocks

    @property
    def pad_block(self) -> int:
        """The all-zero block that padding columns of a forward's tables point at: the pools' last block."""
        return self.num_blocks + 1

    @property
    def allocated(self) -> tuple[int, ...]:
        """The layers whose pools exist."""
        return tuple(i for i, k in enumerate(self.k_pools) if k is not None)

    def allocate(self, layer: int, kv_heads: int, head_dim: int, packed: bool = False) -> None:
        """Create layer `layer`'s zeroed pools for `kv_heads` heads of width `head_dim`; `packed`: one pool serves
        as both (a latent layer's rows hold its whole cache), so `v_pools[layer] is k_pools[layer]`."""
        shape = (self.num_blocks + 2, self.block_size, kv_heads, head_dim)  # + trash_block, pad_block
        self.k_pools[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pools[layer] = self.k_pools[layer] if packed else torch.zeros(shape, dtype=self.dtype,
                                                                                device=self.device)

    def release(self, layers: tuple[int, ...]) -> None:
        """Drop the pools of `layers` (a failed first forward undoes the allocations it made)."""
        for i in layers:
            self.k_pools[i] = self.v_pools[i] = None

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block over the allocated layers (keys and values); 0 before the first forward."""
        return sum((1 if v is k else 2) * k[0].numel() * k.element_size()
                   for k, v in zip(self.k_pools, self.v_pools, strict=True) if k is not None)

    def copy_blocks(self, targets: list[tuple[int, NewBlock]]) -> None:
        """Fill each target block `dst` with its sources' slots, keys re-rotated by (source delta - block delta)."""
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
                rot.extend([p.delta - blk.delta] * n)
                self.stored[phys, off:off + n] = self.stored[p.phys, p.a:p.b] + p.delta - blk.delta
                off += n
        layers = self.allocated
        if not layers:
            return
        src_t = torch.tensor(src, device=self.device)
        dst_t = torch.tensor(dst, device=self.device)
        rot_t = torch.tensor(rot, device=self.device) if any(rot) else None  # split blocks keep their delta
        cdt = accumulation_dtype(self.dtype)
        bases: dict[RopeSpec, tuple[torch.Tensor, torch.Tensor]] = {}  # cos/sin once per distinct basis
        for i in layers:
            k_pool, v_pool, rope = self.k_pools[i], self.v_pools[i], self.ropes[i]
            k_flat, v_flat = k_pool.view(-1, *k_pool.shape[2:]), v_pool.view(-1, *v_pool.shape[2:])
            k = k_flat[src_t]
            if rot_t is not None and not rope.is_identity:
                if rope not in bases:
                    bases[rope] = delta_cos_sin(rot_t, rope.inv_freq, cdt)
                cos, sin = bases[rope]
                k = rotate(k.to(cdt), cos[:, None], sin[:, None], rope.rotary_dim, rope.interleaved)
            k_flat[dst_t] = k.to(k_flat.dtype)
            if v_pool is not k_pool:  # (a packed pool's rows were copied, re-rotated, with the keys)
                v_flat[dst_t] = v_flat[src_t]
