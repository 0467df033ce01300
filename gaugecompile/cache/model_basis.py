"""The basis a model really rotates in, which a cast of the model can round: the cache follows it.

A config gives each layer's RoPE frequencies (`rope_config`), computed as the model's rotary module computes them
when it is built.  The model multiplies positions by its rotary module's `inv_freq` buffer, and a cast of the whole
model (`model.to(torch.bfloat16)`, `model.half()`) rounds that buffer: a bfloat16 Llama then rotates its keys at
`p * round_bf16(inv_freq)`.  Re-rotating them by a delta at the config's frequencies is wrong by
`delta * (f - round(f))`, about 2 radians at a delta of 1000 for bfloat16 (2^-9 relative), so a cache built from
such a model takes the rounded frequencies as its basis.  `from_pretrained(dtype=...)` keeps the buffer in float32;
that model's basis is the config's and nothing changes.

Which buffer belongs to which layer is not written anywhere, so buffers are matched by value: a buffer named
`*inv_freq` whose values are a layer basis's frequencies rounded to the buffer's dtype is that basis in the model.
A basis whose matches agree with it to float32 rounding (`ops.rope_check.same_basis`, what the compiled graphs check at
run time) is kept as it is; one matched only by rounded buffers takes the buffers' values, exactly (a bfloat16 or
float16 value is a float64 value); two matches rounded differently are refused, since the model rotates one
basis in two ways.
"""

from __future__ import annotations

import torch

from ..ops.rope_check import same_basis
from ..rope import RopeSpec, rounded_from
from .rope_config import KVShape, kv_shape_from_config, layer_ropes_from_config

__all__ = ["check_same_layout", "follow_model"]


def rotary_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating buffers named `*inv_freq` (its rotary modules' frequencies), by qualified name."""
    return {name: buf for name, buf in model.named_buffers()
            if name.rsplit(".", 1)[-1].endswith("inv_freq") and buf.is_floating_point() and buf.numel()}


def follow_model(model: torch.nn.Module, ropes: tuple[RopeSpec, ...]) -> tuple[RopeSpec, ...]:
    """`ropes` (a config's per-layer bases) as `model` rotates them: each basis that the model's rotary buffers
    hold only rounded (a cast model) replaced by the buffers' exact values; ValueError where a basis is held at two
    different roundings."""
    buffers = rotary_buffers(model)
    followed: dict[RopeSpec, RopeSpec] = {}
    for rope in dict.fromkeys(r for r in ropes if not r.is_identity):
        matches = {name: buf for name, buf in buffers.items() if rounded_from(buf, rope.inv_freq)}
        if not matches or all(same_basis(buf, rope.inv_freq) for buf in matches.values()):
            continue
        values = {name: buf.detach().reshape(-1).to("cpu", torch.float64) for name, buf in matches.items()}
        first = next(iter(values))
        differ = [name for name, v in values.items() if not torch.equal(v, values[first])]
        if differ:
            raise ValueError(f"model: its rotary buffers {first} ({matches[first].dtype}) and {differ[0]} "
                             f"({matches[differ[0]].dtype}) hold the frequencies {rope.inv_freq[:3].tolist()}... "
                             "rounded differently, so its layers rotate one basis in two ways; cast the whole model "
                             "to one dtype")
        followed[rope] = RopeSpec(values[first], rope.rotary_dim, rope.interleaved, rope.attention_factor)
    return tuple(followed.get(r, r) for r in ropes)


def check_same_layout(model: torch.nn.Module, shape: KVShape, ropes: tuple[RopeSpec, ...]) -> None:
    """Refuse a model whose KV geometry, or whose RoPE bases as it rotates them, differ from a cache's `shape` and
    `ropes` (a cache built from the config of a model cast later says how to follow the cast model)."""
    config = model.config
    if (theirs := kv_shape_from_config(config)) != shape:
        raise ValueError(f"model: its KV shape {theirs} differs from the cache's {shape}")
    config_ropes = layer_ropes_from_config(config)  # (probes the model's code: read once)
    model_ropes = follow_model(model, config_ropes)
    differ = [i for i, (a, b) in enumerate(zip(model_ropes, ropes, strict=True)) if a != b]
    if differ:
        i = differ[0]
        cast = " (the model was cast after the cache was built from its config: build it from the model, " \
            "ManifoldCache(model, ...), to follow the rounded frequencies)" if model_ropes != config_ropes else ""
        raise ValueError(
            f"model: its RoPE basis (rope theta/scaling, rotary dim, pair layout or rounding) differs from the "
            f"cache's at layers {differ}: layer {i} inv_freq[:3] {model_ropes[i].inv_freq[:3].tolist()} vs "
            f"{ropes[i].inv_freq[:3].tolist()}{cast}"
        )
