"""A transformers forward step over ManifoldCache's pools, with the pools and mapping as graph inputs.

`ManifoldCache` does its bookkeeping (which blocks, which slots, which deltas) on the host, so it
cannot be traced.  For export, that bookkeeping is done once, eagerly, and its result -- block
table, per-block deltas, the slots the new tokens are written to -- becomes graph inputs, together
with every layer's pools.  `PoolView` is the cache the model sees while being traced: `update()`
writes the new keys/values into the pools (out of place, so the updated pools are outputs: one
`ScatterND` from each pool input to its output, which a runtime may run in place by binding the
output to the input's buffer) and returns `materialize_kv` of them, which is exactly the site the
gauge passes rewrite into one rotated-query attention per layer.

Nothing of one step's state is baked into the graph: the view length is a dimension of the input
`view_sizes` (an empty `[0, length]` tensor), so one export serves every length, block-table width,
pool size, batch and query length the `dynamic_shapes` allow.  The model's positions come from
`position_ids`; the causal mask only needs the view length and the query length (the queries are
the view's last tokens), so the passes prove it for every length at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from ..ops.materialize import materialize_kv
from ..rope import RopeSpec

__all__ = ["PoolView", "CacheStep", "require_float_pools"]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` only when it changes something: a same-dtype `.to` still leaves an `aten.to` node in
    an exported graph, between `materialize_kv` and the attention."""
    return x if x.dtype == dtype else x.to(dtype)


class PoolView(Cache):
    """A transformers Cache over explicit tensors: pools, block table, deltas and write slots of one forward.

    `length` is the view length after the forward and `q_len` its new tokens (ints or SymInts): the
    cache reports `length - q_len` tokens before them, so the model's mask puts the queries last.
    """

    def __init__(self, rope: RopeSpec, length, q_len, block_table: torch.Tensor, block_delta: torch.Tensor,
                 block_lens: torch.Tensor, slots: torch.Tensor, k_pools: Sequence[torch.Tensor],
                 v_pools: Sequence[torch.Tensor]) -> None:
        super().__init__(layers=[])
        self.rope, self.length, self.q_len = rope, length, q_len
        self.block_table, self.block_delta, self.block_lens = block_table, block_delta, block_lens
        slots = slots.reshape(-1)
        block_size = k_pools[0].shape[1]
        self.slot_index = (slots // block_size, slots % block_size)  # (block, offset) of each new token
        self.k_pools, self.v_pools = list(k_pools), list(v_pools)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - self.q_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset): the view, starting at the first key (queries are at offset length - q_len)."""
        return self.length, 0

    @property
    def is_initialized(self) -> bool:
        return True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new K/V ([batch, kv_heads, q, head_dim]) at `slots`; return the materialised view.  The write
        indexes the pool as it is ([blocks, block_size, ...], no reshape around it), so that it exports as one
        ScatterND from the pool input to the pool output."""
        pools = []
        for pool, new in ((self.k_pools[layer_idx], key_states), (self.v_pools[layer_idx], value_states)):
            rows = _cast(new.transpose(1, 2).reshape(-1, *pool.shape[2:]), pool.dtype)
            pools.append(pool.index_put(self.slot_index, rows))
        self.k_pools[layer_idx], self.v_pools[layer_idx] = pools
        k, v = materialize_kv(pools[0], pools[1], self.block_table, self.block_delta, self.rope, self.length,
                              self.block_lens)
        return _cast(k, key_states.dtype), _cast(v, value_states.dtype)


def require_float_pools(cache, name: str) -> None:
    """ValueError naming `name` when the cache's pools are compressed: the exported step carries float pools."""
    if cache.kv_format.scaled:
        raise ValueError(f"{name}: kv_dtype {cache.kv_format.name!r} pools (codes with scales) do not export yet; "
                         "the ai.gauge node and the exported step read float pools (float32, bfloat16, float16)")


class CacheStep(torch.nn.Module):
    """`model` run on new tokens over a ManifoldCache's state given as tensors.

    forward(input_ids [B, Q], position_ids [B, Q], block_table [B, M], block_delta [B, M], block_lens [B, M],
    slots [B, Q], view_sizes [0, L], k_pools (one [N, S, Hkv, D] per layer), v_pools)
    -> (logits, k_pools, v_pools) with the pools updated by the step.  `block_lens` are the tokens each
    entry holds (the op's mapping), `slots` the flat pool slots (block * S + offset) the new tokens are
    written to; L is the view length after the step (only `view_sizes`' shape is read).  `capture` builds them
    from a ManifoldCache step.
    """

    def __init__(self, model: torch.nn.Module, rope: RopeSpec) -> None:
        super().__init__()
        if not isinstance(rope, RopeSpec):
            raise TypeError(f"rope: expected a gaugecompile.RopeSpec, got {type(rope).__name__}")
        config = getattr(model, "config", None)
        if config is not None:  # an exported graph cannot raise at run time: the bases are compared now
            from ..cache.rope_config import kv_shape_from_config, layer_ropes_from_config, rope_from_config

            if rope_from_config(config) != rope:
                raise ValueError("rope: differs from the RoPE basis of the model's config (rope theta, scaling, "
                                 "rotary dim or pair layout): build the cache from the model's config")
            shape = kv_shape_from_config(config)
            if odd := [i for i, k in enumerate(shape.kinds) if k != "attention"] + list(shape.latent_layers):
                raise ValueError(f"model: layers {sorted(set(odd))} are not plain attention layers (recurrent "
                                 "states, shared or latent KV); the exported step takes one pool pair per layer, so "
                                 "it is not exported (the torch cache handles them)")
            if sliding := shape.sliding_layers:
                raise ValueError(f"model: layers {sliding} have sliding windows; the exported step returns every "
                                 "layer the whole view, so it is not exported (the torch cache handles them)")
            nope = [i for i, r in enumerate(layer_ropes_from_config(config)) if r.is_identity]
            if nope:
                raise ValueError(f"model: layers {nope} use no RoPE (NoPE); the exported step takes one basis for "
                                 "every layer, so it is not exported (the torch cache handles them)")
        self.model, self.rope = model, rope

    def forward(self, input_ids, position_ids, block_table, block_delta, block_lens, slots, view_sizes, k_pools,
                v_pools):
        view = PoolView(self.rope, view_sizes.shape[1], input_ids.shape[1], block_table, block_delta, block_lens,
                        slots, k_pools, v_pools)
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=view, use_cache=True)
        return out.logits, tuple(view.k_pools), tuple(view.v_pools)

    @staticmethod
    def dynamic_shapes(num_layers: int) -> tuple:
        """`torch.export` dynamic shapes for `forward`'s inputs (pass to `export_onnx(..., dynamic_shapes=...)`):
        batch, query length, block-table width, view length and pool size are free, except that export
        specialises a dimension whose example is 1 (capture with two rows and two new tokens for a graph that
        serves both decode and prefill at any batch)."""
        from torch.export import Dim

        tokens, table = {0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO}
        pools = tuple({0: Dim.AUTO} for _ in range(num_layers))
        return tokens, tokens, table, table, table, tokens, {1: Dim.AUTO}, pools, pools

    @classmethod
    def capture(cls, model: torch.nn.Module, cache, input_ids: torch.Tensor):
        """Run one step of `model` on `input_ids` eagerly with ManifoldCache `cache` (advancing it), and
        return `(step, args, logits)`: the module, its inputs for that same step (pools as they were
        before it) and the eager logits -- what an export of the step must reproduce."""
        from ..cache import ManifoldCache

        if not isinstance(cache, ManifoldCache):
            raise TypeError(f"cache: expected a gaugecompile ManifoldCache, got {type(cache).__name__}")
        require_float_pools(cache, "cache")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected a [batch, q_len] tensor, got {shape}")
        step = cls(model, cache.rope)  # checks the bases before the cache advances
        frame = cache.get_seq_length()
        before = [p if p is None else p.clone() for p in (*cache.k_pools, *cache.v_pools)]
        with torch.no_grad():
            logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
        # a layer the step sized held nothing before it: its pools were zeros of the shape it gave them
        before = [b if b is not None else torch.zeros_like(p) for b, p in zip(before, (*cache.k_pools, *cache.v_pools),
                                                                                strict=True)]
        k_pools, v_pools = tuple(before[:len(before) // 2]), tuple(before[len(before) // 2:])
        block_table, block_delta, block_lens, slots, length = cache.last_step  # the mapping this step used
        batch, q_len = input_ids.shape
        position_ids = (frame + torch.arange(q_len, device=input_ids.device)).expand(batch, q_len)
        view_sizes = torch.empty(0, length, dtype=torch.int64, device=input_ids.device)
        args = (input_ids, position_ids, block_table, block_delta, block_lens, slots.view(batch, q_len), view_sizes,
                k_pools, v_pools)
        return step, args, logits
