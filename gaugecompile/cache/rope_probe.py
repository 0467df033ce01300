"""Which layers rotate their keys, and in which basis: read from running the model's own code, never assumed.

A config does not always say which layers apply RoPE: Cohere 2's full-attention layers skip it because of a
test in the attention code (`if self.sliding_window is not None`), not because of a flag.  So each layer's
basis is checked by a probe: a small copy of the model (its config with the vocabulary, widths, heads and
experts shrunk to one head of the same head dim; layer types, windows, RoPE parameters and flags kept) runs one
token at position P and again at P + S.  One token attends only to itself, so no hidden state depends on its
position and a layer's keys differ between the two runs by that layer's own rotation alone: R(S) applied to
the first keys in the layer's basis (a RoPE layer) or nothing (a NoPE layer).  A layer matching neither, or
both, is refused.
"""

from __future__ import annotations

import torch

from ..rope import RopeSpec, delta_cos_sin, rotate

__all__ = ["probe_layer_rotations"]

_POSITION, _SHIFT = 3, 5
_TOL = 1e-4  # the probe runs in float32; a rotation by S moves the fast pairs by O(1)
# config attributes shrunk in the probe copy, to what keeps a model buildable and cheap
_SMALL = {"vocab_size": 16, "intermediate_size": 8, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8,
          "num_local_experts": 2, "num_experts": 2, "n_routed_experts": 2, "num_experts_per_tok": 1, "n_inner": 8}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _probe_config(config, head_dim: int):
    values = config.to_dict()
    for name, small in _SMALL.items():
        if isinstance(values.get(name), int):
            values[name] = min(values[name], small)
    for name in ("num_attention_heads", "num_key_value_heads", "n_head"):
        if isinstance(values.get(name), int):
            values[name] = 1
    for name in ("hidden_size", "n_embd"):
        if isinstance(values.get(name), int):
            values[name] = head_dim
    if "head_dim" in values:
        values["head_dim"] = head_dim
    for name in _TOKEN_IDS:
        if isinstance(values.get(name), int):
            values[name] = 0
    values.pop("torch_dtype", None)
    values.pop("dtype", None)
    probe = type(config)(**values)
    probe._attn_implementation = "eager"
    return probe


def _keys_at(model, position: int) -> list[torch.Tensor]:
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.ones(1, 1, dtype=torch.long), position_ids=torch.tensor([[position]]),
              past_key_values=cache, use_cache=True)
    return [layer.keys.double() for layer in cache.layers]


def probe_layer_rotations(config, candidates: tuple[RopeSpec, ...], head_dim: int) -> tuple[RopeSpec, ...]:
    """Each layer's basis: its candidate (from the rotary module) if its keys rotate by it, no rotation if they do
    not move; ValueError naming the layer otherwise, or when the probe copy cannot be built or run."""
    import transformers

    try:
        probe = _probe_config(config, head_dim)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(probe, dtype=torch.float32).eval()
        first, second = _keys_at(model, _POSITION), _keys_at(model, _POSITION + _SHIFT)
    except Exception as exc:  # noqa: BLE001 -- any failure means the layers could not be checked
        raise ValueError(f"config: could not run a small copy of {config.model_type!r} to check which layers apply "
                         f"RoPE ({type(exc).__name__}: {exc})") from exc
    if len(first) != len(candidates):
        raise ValueError(f"config: the probe copy of {config.model_type!r} cached {len(first)} layers, expected "
                         f"{len(candidates)}")
    out = []
    for i, (a, b, rope) in enumerate(zip(first, second, candidates, strict=True)):
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
