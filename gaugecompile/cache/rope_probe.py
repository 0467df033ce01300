"""Which layers rotate their keys, and in which basis: read from running the model's own code, never assumed.

A config does not always say which layers apply RoPE: Cohere 2's full-attention layers skip it because of a
test in the attention code (`if self.sliding_window is not None`), not because of a flag.  So each layer's
basis is checked by a probe: a small copy of the model (its config with the vocabulary, feed-forward widths,
heads and experts shrunk, the head dim, layers, layer types, windows, RoPE parameters and flags kept) runs one
token at position P and again at P + S.  One token attends only to itself, so no hidden state depends on its
position and a layer's keys differ between the two runs by that layer's own rotation alone: R(S) applied to
the first keys in the layer's basis (a RoPE layer) or nothing (a NoPE layer).  A layer matching neither, or
both, is refused.
"""

from __future__ import annotations

import copy

import torch

from ..rope import RopeSpec, delta_cos_sin, rotate

__all__ = ["build_model", "probe_layer_rotations", "small_model"]

_POSITION, _SHIFT = 3, 5
_TOL = 1e-4  # the probe runs in float32; a rotation by S moves the fast pairs by O(1)
_MAX_PARAMS = 50_000_000  # a probe copy larger than this missed a size to shrink: refuse rather than fill memory


_EXPERT_GROUPS = ("n_group", "topk_group", "num_expert_group")


def _small(name: str, value: int) -> int:
    """What a size attribute of the probe copy becomes (widths and expert counts shrink; the rest stays)."""
    if name == "vocab_size":
        return min(value, 16)
    if name.endswith(("intermediate_size", "ffn_hidden_size")) or name == "n_inner":
        return min(value, 8)
    if name in _EXPERT_GROUPS:
        return 1  # 2 experts in 8 groups would leave none per group
    if name.endswith(("experts_per_tok", "top_k", "topk", "moe_k")):
        return min(value, 2)  # (not 1: LongCat's expert loop squeezes its top-k axis away when it is 1)
    if "experts" in name:
        return min(value, 2)
    if name.endswith("token_id"):
        return 0
    return value


def _shrink(config) -> None:
    from transformers import PretrainedConfig

    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _shrink(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, _small(name, value))


def _probe_config(config, head_dim: int):
    """A copy of `config` with the same layers, layer types, windows, RoPE parameters and head dim, and at most
    2 KV heads (GQA kept) where it has more than 4 heads (fewer are kept: CodeGen splits them in 4 groups), a
    vocabulary of 16, small feed-forwards and 2 experts."""
    probe = copy.deepcopy(config)
    _shrink(probe)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv == 0 and heads > 4:  # (few heads: kept)
        new_kv = min(kv, 2)
        new_heads = new_kv * min(heads // kv, 2)
        for name, value in (("num_attention_heads", new_heads), ("n_head", new_heads),
                            ("num_key_value_heads", new_kv)):
            if isinstance(getattr(probe, name, None), int):
                setattr(probe, name, value)
        for name in ("hidden_size", "n_embd"):
            if isinstance(getattr(probe, name, None), int):
                setattr(probe, name, new_heads * head_dim)
        uniform = "head_dim" not in _per_layer_attributes(probe)  # else each layer keeps its own
        if uniform and isinstance(getattr(probe, "head_dim", None), int) and not isinstance(
                getattr(type(probe), "head_dim", None), property):
            probe.head_dim = head_dim  # (a property where the config derives it: hidden / heads, kept above)
    probe._attn_implementation = "eager"
    return probe


def _per_layer_attributes(config) -> set[str]:
    """The attributes a heterogeneous config sets per layer (transformers' `per_layer_config` overrides)."""
    overrides = config.to_dict().get("per_layer_config") or {}
    return {name for layer in overrides.values() if isinstance(layer, dict) for name in layer}


def _keys_at(model, position: int, shape) -> list:
    """Each cache layer of one forward of `model` on one token at `position`: its keys (float64) where it caches
    them (a latent layer of `shape`: its row as the cache packs it, [k_rot | latent]), else whether it holds a conv
    or recurrent state."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.ones(1, 1, dtype=torch.long), position_ids=torch.tensor([[position]]),
              past_key_values=cache, use_cache=True)
    out = []
    for i, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if shape.latent_dims[i] is not None and isinstance(keys, torch.Tensor):
            keys = torch.cat([layer.values, keys], -1)
        states = (*getattr(layer, "conv_states", {}).values(), *getattr(layer, "recurrent_states", {}).values())
        out.append(keys.double() if isinstance(keys, torch.Tensor) else any(t is not None for t in states))
    return out


def _model_class(config) -> type:
    """The model class of a config the Auto classes do not map (a multimodal model's text config): its modeling
    module's causal LM, else its model, whose `config_class` is the config's class."""
    import importlib

    from transformers import PreTrainedModel

    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
               and getattr(c, "config_class", None) is type(config)]
    for suffix in ("ForCausalLM", "Model"):
        found = [c for c in classes if c.__name__.endswith(suffix)]
        if len(found) == 1:
            return found[0]
    raise ValueError(f"config: no single model class for {type(config).__name__} in {module.__name__}")


def small_model(config, max_params: int = _MAX_PARAMS) -> torch.nn.Module:
    """A float32 model of `config` with seeded random weights (its causal LM, else its base model: a text config
    of a multimodal model may have only that), built only once a meta-device build shows it has at most
    `max_params` parameters (ValueError otherwise: a shrink that missed a size must not fill the memory)."""

    with torch.device("meta"):
        size = sum(p.numel() for p in build_model(config).parameters())
    if size > max_params:
        raise ValueError(f"config: a copy of {config.model_type!r} would have {size} parameters (more than "
                         f"{max_params})")
    torch.manual_seed(0)
    return build_model(config).eval()


def build_model(config) -> torch.nn.Module:
    """`config`'s causal LM in float32 (else its base model, else its modeling module's class for it)."""
    import transformers

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto.from_config(config, dtype=torch.float32)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
    return _model_class(config)._from_config(config, dtype=torch.float32)


def _unzeroed(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every all-zero parameter drawn at random (seeded): a parameter a model initialises to zero
    (ZAYA's key-norm temperature scales every key by it) would zero the keys the probe compares, and a trained
    model's is not zero.  The probe reads which layers rotate, not what the weights are."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return model


def probe_layer_rotations(config, candidates: tuple[RopeSpec, ...], shape) -> tuple[RopeSpec, ...]:
    """Each attention layer's basis: its candidate (from the rotary module) if its keys rotate by it, no rotation if
    they do not move; ValueError naming the layer otherwise, when a state layer of `shape` (a `KVShape`) keeps its
    states outside the cache, or when the probe copy cannot be built or run.  Other layers keep their candidate."""
    try:
        latent = shape.latent_dims[shape.attention_layers[0]]
        model = _unzeroed(small_model(_probe_config(config, shape.head_dim if latent is None else latent[0])))
        first, second = _keys_at(model, _POSITION, shape), _keys_at(model, _POSITION + _SHIFT, shape)
    except Exception as exc:  # noqa: BLE001 -- any failure means the layers could not be checked
        raise ValueError(f"config: could not run a small copy of {config.model_type!r} to check which layers apply "
                         f"RoPE ({type(exc).__name__}: {exc})") from exc
    if len(first) != len(candidates):
        raise ValueError(f"config: the probe copy of {config.model_type!r} cached {len(first)} layers, expected "
                         f"{len(candidates)}")
    out = []
    for i, (a, b, rope) in enumerate(zip(first, second, candidates, strict=True)):
        kind = shape.kinds[i]
        if "state" in kind and not isinstance(a, torch.Tensor) and not a:
            raise ValueError(f"config: layer {i} of {config.model_type!r} is a {kind} layer whose conv/recurrent "
                             "states a forward does not write into the cache (the model keeps them itself), so "
                             "fork, reorder and beam search could not copy them")
        if "attention" not in kind:
            out.append(rope)
            continue
        if not isinstance(a, torch.Tensor):
            raise ValueError(f"config: attention layer {i} of {config.model_type!r} cached no keys in the probe")
        cos, sin = delta_cos_sin(torch.tensor(_SHIFT), rope.inv_freq, torch.float64)
        rotates = torch.allclose(rotate(a, cos, sin, rope.rotary_dim, rope.interleaved), b, rtol=_TOL, atol=_TOL)
        still = torch.allclose(a, b, rtol=_TOL, atol=_TOL)
        if still and (rope.is_identity or not rotates):
            out.append(RopeSpec.none(rope.rotary_dim))
        elif rotates and not still:
            out.append(rope)
        else:
            what = "both" if rotates else "neither"
            raise ValueError(f"config: layer {i} of {config.model_type!r}: its keys at positions {_POSITION} and "
                             f"{_POSITION + _SHIFT} match {what} of its RoPE basis and no rotation; refusing to guess")
    return tuple(out)
