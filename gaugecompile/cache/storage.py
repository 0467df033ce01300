"""The physical KV pools of every layer, the stored position of every slot, and block copies.

Pools are written once per token (`write`) and never moved; the only other writes are
copy-on-write block copies (`copy_blocks`) of bytes as they are, scales included: the tokens of a block an edit
splits, or a shared partial last block taking new tokens, each keeping its delta.  No stored key is ever re-rotated
(a partial last block whose delta is not the new tokens' frame stays as it is, and the new tokens start a block of
their own: `forward.place_tokens`), so a compressed pool (`gaugecompile.kv_format`) is quantized once, when its token
is written, whatever edits follow.  Stored positions live on the host (int64 per slot): the planner reads them to
find where an edit cuts a block, and a copy records the stored positions of its slots.

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

from ..kv_format import SCALE_DTYPE, KVFormat
from .mapping import NewBlock

__all__ = ["BlockStorage"]


class BlockStorage:
    """Per-layer `k_pool`/`v_pool` of shape [num_blocks + 2, block_size, kv_heads, width] (the allocator's blocks,
    then `trash_block` and `pad_block`; width: the head dim in `format`'s elements), and for a compressed format their
    scales `k_scales`/`v_scales` [num_blocks + 2, block_size, kv_heads, groups]; None until the layer's first write
    (`allocate`) sizes them."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, fmt: KVFormat, device: torch.device,
    ) -> None:
        self.k_pools: list[torch.Tensor | None] = [None] * num_layers
        self.v_pools: list[torch.Tensor | None] = [None] * num_layers
        self.k_scales: list[torch.Tensor | None] = [None] * num_layers
        self.v_scales: list[torch.Tensor | None] = [None] * num_layers
        self.stored = np.zeros((num_blocks, block_size), dtype=np.int64)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.format = fmt
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
        """Create layer `layer`'s zeroed pools (and scales) for `kv_heads` heads of width `head_dim`; `packed`: one
        pool serves as both (a latent layer's rows hold its whole cache), so `v_pools[layer] is k_pools[layer]`.
        Zero codes under zero scales are zeros: the pad block reads as zeros in every format."""
        fmt = self.format
        fmt.check_head_dim(head_dim, "key_states")
        rows = (self.num_blocks + 2, self.block_size, kv_heads)  # + trash_block, pad_block
        made = []
        for _ in range(1 if packed else 2):
            pool = torch.zeros((*rows, fmt.pool_width(head_dim)), dtype=fmt.storage, device=self.device)
            scale = (torch.zeros((*rows, fmt.groups(head_dim)), dtype=SCALE_DTYPE, device=self.device)
                     if fmt.scaled else None)
            made.append((pool, scale))
        (self.k_pools[layer], self.k_scales[layer]), (self.v_pools[layer], self.v_scales[layer]) = made[0], made[-1]

    def release(self, layers: tuple[int, ...]) -> None:
        """Drop the pools of `layers` (a failed first forward undoes the allocations it made)."""
        for i in layers:
            self.k_pools[i] = self.v_pools[i] = self.k_scales[i] = self.v_scales[i] = None

    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        """Every distinct tensor layer `layer` stores (pools, then scales)."""
        out: list[torch.Tensor] = []
        for t in (self.k_pools[layer], self.v_pools[layer], self.k_scales[layer], self.v_scales[layer]):
            if t is not None and all(t is not seen for seen in out):
                out.append(t)
        return out

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block over the allocated layers (keys and values, scales included); 0 before the first
        forward."""
        return sum(t[0].numel() * t.element_size() for i in self.allocated for t in self.layer_tensors(i))

    def copy_blocks(self, targets: list[tuple[int, NewBlock]]) -> None:
        """Fill each target block `dst` with its sources' slots, bytes as they are (codes and scales); every source
        keeps its delta, which must be the block's (a key is never re-rotated)."""
        if not targets:
            return
        src, dst = [], []
        bs = self.block_size
        for phys, blk in targets:
            off = 0
            for p in blk.sources:
                if p.delta != blk.delta:
                    raise RuntimeError(f"copy_blocks: block {p.phys} at delta {p.delta} copied into a block at delta "
                                       f"{blk.delta} would re-rotate its keys (a planner error)")
                n = p.b - p.a
                src.extend(range(p.phys * bs + p.a, p.phys * bs + p.b))
                dst.extend(range(phys * bs + off, phys * bs + off + n))
                self.stored[phys, off:off + n] = self.stored[p.phys, p.a:p.b]
                off += n
        if not self.allocated:
            return
        src_t = torch.tensor(src, device=self.device)
        dst_t = torch.tensor(dst, device=self.device)
        for i in self.allocated:
            for t in self.layer_tensors(i):
                flat = t.view(-1, *t.shape[2:])
                flat[dst_t] = flat[src_t]
