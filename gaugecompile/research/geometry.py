"""Geometry probes of attention: key orthogonality, attention entropy and the value manifold, per layer.

The Bayesian-geometry papers this project comes from (arXiv 2512.22471, 2512.22473) report three signatures:
near-orthogonal keys in the first layer (a hypothesis frame), attention that sharpens with depth (entropy
falling layer by layer), and late-layer values on a low-dimensional curve ordered by posterior entropy.
`probe_geometry(model, ids, cache)` measures them on a forward of `ids` over any transformers cache (the
view a ManifoldCache holds after edits included):
- keys: per KV head, the cosines between distinct keys of the view; their mean |cos| and largest |cos|;
- attention entropy (bits) of each query token's distribution over the view, per head: its mean over the
  tokens and its spread (standard deviation), then summarised over heads;
- values: the share of the variance of the view's values on their first three principal components, and the
  Pearson correlation between each query token's coordinate on the first one and its attention entropy.
Keys and values are the ones the layer attends with (what the cache's `update` returns: for a ManifoldCache,
keys rotated into the query's frame), attention weights come from the model's eager attention
(`output_attentions`), so an edit that preserves the geometry gives the same probes as the re-rotated
reference: that is the gauge check of the tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["LayerGeometry", "probe_geometry"]

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class LayerGeometry:
    """The probes of one layer (floats; per-head lists in head order)."""

    layer: int
    key_abs_cos_mean: float
    key_abs_cos_max: float
    entropy_bits: list[float]  # per head: mean over query tokens
    entropy_spread_bits: list[float]  # per head: standard deviation over query tokens
    value_pc_share: list[float]  # first three principal components' shares of the value variance
    value_pc1_entropy_corr: float  # nan when fewer than 3 query tokens or a constant coordinate

    def as_dict(self) -> dict:
        return asdict(self)


def _key_cosines(keys: torch.Tensor) -> tuple[float, float]:
    """keys [kv_heads, n, d]: mean and largest |cos| over distinct pairs, over heads."""
    unit = torch.nn.functional.normalize(keys.double(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    n = gram.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    cos = gram.abs()[:, off]
    return (float(cos.mean()), float(cos.max())) if cos.numel() else (float("nan"), float("nan"))


def _entropy_bits(attention: torch.Tensor) -> torch.Tensor:
    """attention [heads, q, n] -> entropy in bits [heads, q]."""
    p = attention.double()
    return -torch.special.xlogy(p, p).sum(-1) / _LOG2  # 0 log 0 = 0: the masked keys


def _value_manifold(values: torch.Tensor, query_entropy: torch.Tensor) -> tuple[list[float], float]:
    """values [kv_heads, n, d] of the view, query_entropy [q] (mean over heads) of its last q tokens."""
    x = values.double().transpose(0, 1).reshape(values.shape[1], -1)  # [n, kv_heads * d]
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = s**2
    share = (var[:3] / var.sum()).tolist() if float(var.sum()) > 0 else [float("nan")] * 3
    q = query_entropy.numel()
    coord = (x[-q:] @ vh[0])
    if q < 3 or float(coord.std()) == 0 or float(query_entropy.std()) == 0:
        return share, float("nan")
    corr = torch.corrcoef(torch.stack([coord, query_entropy.double()]))[0, 1]
    return share, float(corr)


def probe_geometry(model: torch.nn.Module, input_ids: torch.Tensor, past_key_values=None) -> list[LayerGeometry]:
    """Run `model` on `input_ids` ([1, q]) over `past_key_values` (a cache holding the context, or None) with eager
    attention, and return each layer's probes.  The cache advances by the forward, as any forward does."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected one row [1, q], got {got}")
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if past_key_values is None else past_key_values
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        k, v = update(key_states, value_states, layer_idx, *args, **kwargs)
        seen[layer_idx] = (k[0].detach(), v[0].detach())
        return k, v

    # transformers has a public setter (set_attn_implementation) but no public getter of the implementation
    previous = model.config._attn_implementation
    cache.update = recording_update
    try:
        model.set_attn_implementation("eager")  # attention weights come from the eager path
        with torch.no_grad():
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, output_attentions=True)
    finally:
        del cache.update  # the instance attribute: the class's update again
        model.set_attn_implementation(previous)
    layers = []
    for i, attention in enumerate(out.attentions):
        keys, values = seen[i]
        entropy = _entropy_bits(attention[0])  # [heads, q]
        cos_mean, cos_max = _key_cosines(keys)
        share, corr = _value_manifold(values, entropy.mean(0))
        layers.append(LayerGeometry(i, cos_mean, cos_max, entropy.mean(1).tolist(), entropy.std(1, unbiased=False)
                                    .tolist(), share, corr))
    return layers
