"""Baselines the demo and the benchmarks measure against: a re-rotating StreamingLLM sink cache.

transformers 5 removed `SinkCache`. `RerotatingSinkCache` does what it did: keep the first
`num_sink_tokens` tokens and the most recent ones, and when tokens are evicted, re-rotate every kept
window key back by the number of evicted tokens (O(window * head_dim) per layer and eviction) and
concatenate sinks + shifted window + new tokens into fresh tensors. Positions are taken inside the
cache as StreamingLLM does: the cache always looks like a contiguous sequence 0..len-1, and new
tokens get position `get_seq_length()`. Eviction happens right after each update (the returned K/V
still hold everything the step attends to), so that the next token fits and transformers' default
position ids (`get_seq_length()` + arange) are the in-cache positions, also inside `generate()`.

One difference from the former class: the shift angle is computed exactly (`delta_cos_sin`, float64
reduction) instead of composing float32 cos/sin tables, so the baseline is as exact as the cache it is
compared with, and the comparison measures cost, not rounding.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..rope import RopeSpec, accumulation_dtype, delta_cos_sin, rotate

__all__ = ["RerotatingSinkCache", "SinkLayer", "append_rerotated", "rope_of_model"]


class SinkLayer(DynamicLayer):
    """One layer: sinks + most recent tokens, kept keys re-rotated on every eviction."""

    def __init__(self, rope: RopeSpec, num_sink_tokens: int, capacity: int, evict_multiple: int = 1):
        super().__init__()
        self.rope = rope
        self.num_sink_tokens = num_sink_tokens
        self.capacity = capacity
        self.evict_multiple = evict_multiple

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append, return sinks + window + new for attention, then evict so the next token fits."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        incoming = key_states.shape[-2]
        if self.get_seq_length() + incoming > self.capacity:
            raise ValueError(
                f"key_states: {incoming} new tokens do not fit next to {self.get_seq_length()} held "
                f"(capacity {self.capacity}); feed a long prompt in pieces of at most the free room"
            )
        keys = self.keys = torch.cat([self.keys, key_states], dim=-2)
        values = self.values = torch.cat([self.values, value_states], dim=-2)
        overflow = self.get_seq_length() + 1 - self.capacity
        if overflow > 0:
            rounded = -(-overflow // self.evict_multiple) * self.evict_multiple
            self.shift(min(rounded, self.get_seq_length() - self.num_sink_tokens))
        return keys, values

    def shift(self, evict: int) -> None:
        """Drop the `evict` oldest non-sink tokens; re-rotate the kept window keys `evict` positions back."""
        length, sink = self.get_seq_length(), self.num_sink_tokens
        if not 0 <= evict <= length - sink:
            raise ValueError(f"evict: expected 0..{length - sink} tokens (non-sink tokens held), got {evict}")
        kept_keys = self.keys[:, :, sink + evict:]
        compute = accumulation_dtype(kept_keys.dtype)
        cos, sin = delta_cos_sin(torch.tensor(-evict), self.rope.inv_freq, compute)
        kept_keys = rotate(kept_keys.to(compute), cos, sin, self.rope.rotary_dim, self.rope.interleaved)
        self.keys = torch.cat([self.keys[:, :, :sink], kept_keys.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values[:, :, :sink], self.values[:, :, sink + evict:]], dim=-2)


class RerotatingSinkCache(Cache):
    """StreamingLLM cache: `num_sink_tokens` sinks + up to `window_length` recent tokens, re-rotating on eviction.

    `evict_multiple` evicts in multiples of that many tokens (a block-granular window, as a paged cache
    evicts whole blocks); 1 evicts exactly the overflow, as `SinkCache` did.
    """

    def __init__(self, rope: RopeSpec, num_layers: int, *, num_sink_tokens: int, window_length: int,
                 evict_multiple: int = 1):
        if not isinstance(rope, RopeSpec):
            raise TypeError(f"rope: expected a gaugecompile.RopeSpec, got {type(rope).__name__}")
        for name, value, low in (("num_layers", num_layers, 1), ("num_sink_tokens", num_sink_tokens, 0),
                                 ("window_length", window_length, 1), ("evict_multiple", evict_multiple, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        capacity = num_sink_tokens + window_length
        super().__init__(layers=[SinkLayer(rope, num_sink_tokens, capacity, evict_multiple)
                                 for _ in range(num_layers)])
        self.num_sink_tokens, self.window_length = num_sink_tokens, window_length

    @classmethod
    def for_model(cls, model: torch.nn.Module, **kwargs) -> RerotatingSinkCache:
        """A sink cache for a rotate-half RoPE model with a `rotary_emb.inv_freq` buffer (Llama family)."""
        return cls(rope_of_model(model), model.config.num_hidden_layers, **kwargs)

    def shift(self, evict: int) -> None:
        """Evict `evict` non-sink tokens in every layer now (re-rotating the kept keys)."""
        for layer in self.layers:
            layer.shift(evict)


def rope_of_model(model: torch.nn.Module) -> RopeSpec:
    """RopeSpec of a Llama-family model (rotate-half, full rotary, default/linear/NTK inv_freq buffer)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise ValueError(f"model: expected a Llama-family model with model.rotary_emb.inv_freq, got "
                         f"{type(model).__name__}")
    if getattr(rotary, "rope_type", "default") == "dynamic":
        raise ValueError("model: dynamic NTK RoPE changes inv_freq with length; a static re-rotation is not exact")
    factor = float(getattr(rotary, "attention_scaling", 1.0))
    return RopeSpec(inv_freq.double().cpu(), rotary_dim=2 * inv_freq.numel(), attention_factor=factor)


def cut_and_rerotate(full: Cache, start: int, end: int, rope: RopeSpec, config) -> DynamicCache:
    """The re-rotating way to delete: drop positions [start, end) of every layer of `full` and rotate the later
    keys back by end - start (gather + re-rotate, O(tokens after the cut) per layer): what
    `ManifoldCache.delete` replaces by a table edit."""
    edited = DynamicCache(config=config)
    for index, layer in enumerate(full.layers):
        k, v = layer.keys, layer.values
        compute = accumulation_dtype(k.dtype)
        cos, sin = delta_cos_sin(torch.tensor(start - end), rope.inv_freq, compute)
        later = rotate(k[:, :, end:].to(compute), cos, sin, rope.rotary_dim, rope.interleaved).to(k.dtype)
        edited.update(torch.cat([k[:, :, :start], later], 2), torch.cat([v[:, :, :start], v[:, :, end:]], 2), index)
    return edited


def append_rerotated(cache: Cache, chunk: Cache, shift: int, rope: RopeSpec) -> None:
    """The re-rotating way to reuse a cached chunk: rotate every key of `chunk` (cached at positions 0..n-1)
    forward by `shift` positions and append keys and values to each layer of `cache`. O(n * head_dim) per
    layer: what `ManifoldCache.splice` replaces by a table edit."""
    if len(cache.layers) != len(chunk.layers):
        raise ValueError(f"chunk: expected {len(cache.layers)} layers like cache, got {len(chunk.layers)}")
    for layer, piece in zip(cache.layers, chunk.layers, strict=True):
        compute = accumulation_dtype(piece.keys.dtype)
        cos, sin = delta_cos_sin(torch.tensor(shift), rope.inv_freq, compute)
        keys = rotate(piece.keys.to(compute), cos, sin, rope.rotary_dim, rope.interleaved).to(piece.keys.dtype)
        layer.keys = torch.cat([layer.keys, keys], dim=-2)
        layer.values = torch.cat([layer.values, piece.values], dim=-2)
