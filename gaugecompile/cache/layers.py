"""Per-layer behaviour of a `ManifoldCache`, in transformers' manner (`DynamicLayer`, `LinearAttentionLayer`):
`ManifoldCache.update` checks and writes through the layer object instead of switching on layer kinds.

- `AttentionLayer`: keys and values in its own pools, written once per token at the forward's slots, read back
  as the materialised view (gather + re-rotate, which the gauge backend's passes turn into the rotated-query op);
- `LatentLayer`: a multi-head latent attention layer, whose latent and RoPE key are packed in one pool row (the
  rotation acts on the leading RoPE dims);
- `StatelessLayer`: a layer with no keys and values here (a linear-attention, SSM or convolution layer, whose
  states `states.py` keeps per sequence, or a dummy layer): an `update` of it is refused, naming the layer.
"""

from __future__ import annotations

import torch

from ..kv_format import quantize
from ..ops.materialize import materialize_kv
from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate
from .rope_config import KVShape
from .storage import BlockStorage

__all__ = ["AttentionLayer", "LatentLayer", "StatelessLayer", "FLOATS", "build_layers", "window_offset"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _storage_error(name: str, t: torch.Tensor, device: torch.device) -> Exception | None:
    """Why `t` cannot be stored in the pools (its dtype or device), or None."""
    if t.dtype not in FLOATS:
        return TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.device != device:
        return ValueError(f"{name}: expected device {device} (the pools'), got {t.device}")
    return None


def window_offset(window: int | None, length, q) -> int:
    """How many of the first view tokens a layer with sliding `window` does not see in a forward of `q` new tokens
    that ends at `length`: it keeps the W - 1 tokens before the new ones, as transformers' sliding-window cache does
    (which also fixes what a model whose mask has no window attends to).  0 for a full-attention layer (None)."""
    return 0 if window is None else max(length - q - window + 1, 0)


class StatelessLayer:
    """A layer whose keys and values the cache does not hold (`kind`: "state" or "none")."""

    def __init__(self, index: int, kind: str, attention_layers: tuple[int, ...]) -> None:
        self.index, self.kind, self.attention_layers = index, kind, attention_layers

    def check(self, key_states, value_states) -> Exception | None:
        return ValueError(f"layer_idx: layer {self.index} is a {self.kind} layer (no keys and values); the attention "
                          f"layers are {list(self.attention_layers)}")


class AttentionLayer:
    """An attention layer's pools in `storage` (sized by its first write), its RoPE basis and sliding window."""

    packed = False  # one pool holds keys and values (a latent layer's rows)

    def __init__(self, index: int, rope: RopeSpec, head_dim: int, window: int | None, storage: BlockStorage) -> None:
        self.index, self.rope, self.head_dim, self.window, self.storage = index, rope, head_dim, window, storage

    @property
    def pools(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.storage.k_pools[self.index], self.storage.v_pools[self.index]

    @property
    def scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The pools' scales (None for a float format)."""
        return self.storage.k_scales[self.index], self.storage.v_scales[self.index]

    def check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> Exception | None:
        """Why K/V ([batch, kv_heads, q, head_dim]) do not fit the pools, or None (static checks: guards, not
        run-time work, under torch.compile)."""
        pool, dim = self.storage.k_pools[self.index], self.head_dim
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if (not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[3] != dim or t.shape[1] < 1
                    or (pool is not None and t.shape[1] != pool.shape[2])):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                if pool is None:  # its first update sizes the pools: any number of heads, the basis's head dim
                    heads, where = "kv_heads", "the head dim the cache's RoPE basis was read with"
                else:
                    heads, where = pool.shape[2], f"layer {self.index}'s pools, sized by its first update"
                return ValueError(f"{name}: expected [batch, {heads}, q_len, head_dim={dim}] ({where}), got {got}")
            if (error := _storage_error(name, t, self.storage.device)) is not None:
                return error
        if value_states.shape != key_states.shape:
            return ValueError(
                f"value_states: expected key_states' shape {tuple(key_states.shape)}, got {tuple(value_states.shape)}"
            )
        return None

    def pack(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the pools store for the model's K/V."""
        return key_states, value_states

    def unpack(self, k: torch.Tensor, v: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The view as the model expects it back: in its dtypes."""
        return k.to(key_states.dtype), v.to(value_states.dtype)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, slots: torch.Tensor) -> None:
        """Store the new tokens ([batch, heads, q, dim], packed) at the flat pool `slots`, row-major, in the pools'
        format (quantized here, once: `kv_format.quantize`).  A first write sizes the pools, traced inline under
        torch.compile (Dynamo replays the store after the graph): a graph break here would split the layer's
        rotated query from its attention, and the site could not be rewritten."""
        if self.storage.k_pools[self.index] is None:
            self.storage.allocate(self.index, key_states.shape[1], key_states.shape[3],
                                  packed=self.packed)
        rows = [key_states.transpose(1, 2).flatten(0, 1)]  # [batch * q, heads, dim]
        if not self.packed:
            rows.append(value_states.transpose(1, 2).flatten(0, 1))
        self.overwrite(*(quantize(r, self.storage.format) for r in rows), slots=slots)

    def window_offset(self, length, q) -> int:
        """How many of the first view tokens this layer does not see (`window_offset`)."""
        return window_offset(self.window, length, q)

    def view(self, block_table: torch.Tensor, block_delta: torch.Tensor, block_lens: torch.Tensor, length, q,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The materialised keys and values the layer attends to after a forward of `q` tokens ending at `length`,
        in the model's `dtype` (gather + dequantize + re-rotate by each entry's delta: the node the gauge backend
        rewrites)."""
        (k_pool, v_pool), (k_scale, v_scale) = self.pools, self.scales
        k, v = materialize_kv(k_pool, v_pool, block_table, block_delta, self.rope, length, block_lens,
                              k_scale=k_scale, v_scale=v_scale, dtype=dtype)
        if offset := self.window_offset(length, q):
            k, v = k[:, :, offset:], v[:, :, offset:]
        return k, v

    def overwrite(self, *stored: tuple[torch.Tensor, torch.Tensor | None], slots: torch.Tensor) -> None:
        """Put rows at the flat pool `slots`: (codes, scales) of the keys, then of the values (not for a packed
        layer), as `kv_format.quantize` made them."""
        targets = ((self.storage.k_pools, self.storage.k_scales), (self.storage.v_pools, self.storage.v_scales))
        for (codes, scale), (pools, scales) in zip(stored, targets, strict=False):
            for new, t in ((codes, pools[self.index]), (scale, scales[self.index])):
                if t is not None:  # float8 as its bytes (index_copy_ has no float8 kernel on the CPU)
                    flat = t.view(-1, *t.shape[2:])
                    if t.dtype == torch.float8_e4m3fn:
                        flat, new = flat.view(torch.uint8), new.view(torch.uint8)
                    flat.index_copy_(0, slots, new)

    def stored(self, key_states: torch.Tensor, value_states: torch.Tensor, delta: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's new K/V ([1, heads, k, dim], rotated in the query's frame) as the pools would store them
        (a float format: the recompute refuses compressed ones): keys rotated by `-delta` (per token) into their
        blocks' frames (a NoPE layer's as the model wrote them)."""
        k_pool, v_pool = self.pools
        keys = key_states[0].transpose(0, 1)  # [k, Hkv, D]
        if not self.rope.is_identity:
            cos, sin = delta_cos_sin(-delta, self.rope.inv_freq, accumulation_dtype(k_pool.dtype))
            keys = rotate(keys.to(cos.dtype), cos[:, None], sin[:, None], self.rope.rotary_dim, self.rope.interleaved)
        return keys.to(k_pool.dtype), value_states[0].transpose(0, 1).to(v_pool.dtype)


class LatentLayer(AttentionLayer):
    """A multi-head latent attention layer: `update(latent [batch, 1, q, R], k_rot [batch, 1, q, r])` stores one
    packed row `[k_rot | latent]` per token; the view comes back as (latent, re-rotated RoPE keys)."""

    packed = True

    def __init__(self, index: int, rope: RopeSpec, dims: tuple[int, int], window: int | None,
                 storage: BlockStorage) -> None:
        super().__init__(index, rope, sum(dims), window, storage)
        self.rope_dim, self.rank = dims

    def check(self, latent_states: torch.Tensor, rope_states: torch.Tensor) -> Exception | None:
        for name, t, width, what in (("key_states", latent_states, self.rank, "latent"),
                                     ("value_states", rope_states, self.rope_dim, "RoPE key")):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 1 or t.shape[3] != width:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                return ValueError(f"{name}: layer {self.index} caches multi-head latent attention, expected [batch, "
                                  f"1, q_len, {width}] (the {what}), got {got}")
            if (error := _storage_error(name, t, self.storage.device)) is not None:
                return error
        if latent_states.shape[:3] != rope_states.shape[:3]:
            return ValueError(f"value_states: expected key_states' batch and length {tuple(latent_states.shape[:3])}, "
                              f"got {tuple(rope_states.shape[:3])}")
        return None

    def pack(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.cat([value_states, key_states.to(value_states.dtype)], -1)
        return packed, packed

    def unpack(self, k: torch.Tensor, v: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return k[..., self.rope_dim:].to(key_states.dtype), k[..., :self.rope_dim].to(value_states.dtype)


def build_layers(shape: KVShape, ropes: tuple[RopeSpec, ...], storage: BlockStorage
                 ) -> list[AttentionLayer | StatelessLayer]:
    """One layer object per layer of `shape`."""
    out: list[AttentionLayer | StatelessLayer] = []
    for i, kind in enumerate(shape.kinds):
        if "attention" not in kind:
            out.append(StatelessLayer(i, kind, shape.attention_layers))
        elif (dims := shape.latent_dims[i]) is not None:
            out.append(LatentLayer(i, ropes[i], dims, shape.windows[i], storage))
        else:
            out.append(AttentionLayer(i, ropes[i], shape.head_dims[i], shape.windows[i], storage))
    return out
