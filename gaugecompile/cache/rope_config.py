"""Read a model's RoPE (frequencies, rotary width, pair layout) and KV shapes from its transformers config.

The config alone does not say how pairs are formed or, for some architectures, how wide the rotary
part is, so the basis is taken from the model's own code: its rotary module gives `inv_freq` (exactly
the float32 values the model multiplies positions by), and a probe of its `apply_rotary_pos_emb`
decides between rotate-half and interleaved pairs.  Anything that does not match one of the two
layouts exactly is refused rather than guessed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..rope import RopeSpec

__all__ = ["KVShape", "kv_shape_from_config", "rope_from_config"]

# inv_freq of these schemes changes with the sequence length, so no static basis exists.
_DYNAMIC_ROPE = {
    "dynamic": "dynamic NTK rescales inv_freq as the sequence grows, so keys stored earlier are in another basis",
    "longrope": "LongRoPE switches between short and long frequency factors with the sequence length",
}
_PROBE_POSITION = 7


@dataclass(frozen=True)
class KVShape:
    """What a decoder config fixes of its KV: the layer count and the head dim the RoPE basis is read with (the KV
    heads are the model's, read from its first update: a tensor-parallel rank holds a share of the config's)."""

    num_layers: int
    head_dim: int


def kv_shape_from_config(config) -> KVShape:
    """Layer count and head dim of a transformers decoder config (refuses non-full attention)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config)
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise ValueError(
            f"config: ManifoldCache supports full-attention layers only, got layer types {odd} "
            "(for a sliding window use ManifoldCache.set_window)"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVShape(int(config.num_hidden_layers), int(head_dim))


def _modeling_module(config):
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ValueError(f"config: cannot import the modeling code of {config.model_type!r} ({name})") from exc


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    per_layer = params and all(isinstance(v, dict) for v in params.values())
    if isinstance(params, dict) and "rope_type" not in params and per_layer:
        raise ValueError("config.rope_parameters: per-layer-type RoPE is not supported by ManifoldCache")
    return params.get("rope_type", "default") if isinstance(params, dict) else "default"


def _match_layout(rotated: torch.Tensor, x: torch.Tensor, inv_freq: torch.Tensor, scaling: float, arch: str) -> bool:
    """True if `rotated` is `x` rotated to _PROBE_POSITION with interleaved pairs, False if rotate-half."""
    rotary_dim = 2 * inv_freq.numel()
    pos = torch.tensor([_PROBE_POSITION])
    matches = []
    for interleaved in (False, True):
        spec = RopeSpec(inv_freq, rotary_dim, interleaved)
        expect = spec.apply(x, pos)
        expect = torch.cat((expect[..., :rotary_dim] * scaling, expect[..., rotary_dim:]), dim=-1)
        if torch.allclose(rotated, expect, atol=1e-5, rtol=1e-5):
            matches.append(interleaved)
    if len(matches) != 1:
        raise ValueError(
            f"config: the rotary embedding of {arch!r} matches neither rotate-half nor interleaved pairs over "
            f"rotary_dim={rotary_dim}; refusing to guess its layout"
        )
    return matches[0]


def _rotary_class(module, arch: str):
    classes = [
        obj for name, obj in vars(module).items()
        if name.endswith("RotaryEmbedding") and isinstance(obj, type) and issubclass(obj, torch.nn.Module)
        and obj.__module__ == module.__name__
    ]
    if len(classes) != 1 or not hasattr(module, "apply_rotary_pos_emb"):
        raise ValueError(
            f"config: cannot find a single rotary embedding class and apply_rotary_pos_emb in the modeling code of "
            f"{arch!r}; ManifoldCache does not know its RoPE layout"
        )
    return classes[0]


def _gptj_rope(config, module, head_dim: int) -> RopeSpec:
    rotary_dim = getattr(config, "rotary_dim", None)
    if not rotary_dim:
        raise ValueError("config.rotary_dim: GPT-J without rotary_dim rotates over the embedding width; unsupported")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    table = module.create_sinusoidal_positions(_PROBE_POSITION + 1, rotary_dim)[_PROBE_POSITION]
    sin, cos = table.double().chunk(2)
    angles = _PROBE_POSITION * inv_freq.double()
    if not (torch.allclose(sin, angles.sin(), atol=1e-5) and torch.allclose(cos, angles.cos(), atol=1e-5)):
        raise ValueError("config: GPT-J sinusoidal table does not match base-10000 frequencies; unsupported variant")
    x = torch.randn(1, 1, 1, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rot = module.apply_rotary_pos_emb(x[..., :rotary_dim], sin[None, None].float(), cos[None, None].float())
    rotated = torch.cat((rot, x[..., rotary_dim:]), dim=-1)
    return RopeSpec(inv_freq, rotary_dim, _match_layout(rotated, x, inv_freq, 1.0, "gptj"))


def rope_from_config(config) -> RopeSpec:
    """The static RoPE basis of a transformers decoder config, learnt from the model's own rotary code.

    Raises ValueError for schemes with no static basis (dynamic NTK, LongRoPE) and for architectures
    whose rotary layout cannot be identified.
    """
    rope_type = _rope_type(config)
    if rope_type in _DYNAMIC_ROPE:
        raise ValueError(
            f"config.rope_parameters: rope_type {rope_type!r} cannot be cached by block deltas: "
            f"{_DYNAMIC_ROPE[rope_type]}"
        )
    shape = kv_shape_from_config(config)
    module = _modeling_module(config)
    arch = config.model_type
    if arch == "gptj":
        return _gptj_rope(config, module, shape.head_dim)
    rotary = _rotary_class(module, arch)(config=config)
    inv_freq = rotary.inv_freq.detach().to("cpu")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    x = torch.randn(1, 1, 1, shape.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary(x, torch.tensor([[_PROBE_POSITION]]))
    rotary_dim = cos.shape[-1]
    if rotary_dim != 2 * inv_freq.numel() or rotary_dim > shape.head_dim:
        raise ValueError(
            f"config: {arch!r} rotary module gives cos of width {rotary_dim} for {inv_freq.numel()} frequencies "
            f"and head_dim {shape.head_dim}; unsupported layout"
        )
    # Partial-rotary models (NeoX, Phi, ...) rotate the leading rotary_dim dims and pass the rest through.
    rot, _ = module.apply_rotary_pos_emb(x[..., :rotary_dim], x[..., :rotary_dim], cos.double(), sin.double())
    rotated = torch.cat((rot, x[..., rotary_dim:]), dim=-1)
    interleaved = _match_layout(rotated, x, inv_freq, scaling, arch)
    return RopeSpec(inv_freq, rotary_dim, interleaved, attention_factor=scaling)
