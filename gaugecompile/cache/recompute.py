"""Which tokens of a spliced chunk `ManifoldCache.recompute` recomputes: the selection policies.

A chunk prefilled on its own never attended to the context it is spliced into, so its KV differs from a
re-prefill's.  Recomputing a few of its tokens in the new context closes most of that gap:
- "first" (EPIC, ICML'25): the first tokens of the chunk, where attention to the missing context matters
  most (they carry the chunk's attention sinks);
- "deviation" (CacheBlend, EuroSys'25): the tokens whose KV changes most when one cheap probe layer is
  recomputed for every token of the chunk (the layers below it recomputed too), measured there and ranked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .manifold import ManifoldCache

__all__ = ["POLICIES", "choose_tokens"]

POLICIES = ("first", "deviation")


def choose_tokens(cache: ManifoldCache, model: torch.nn.Module, seq: int, spans, fraction: float, policy: str,
                  probe_layer: int) -> list[list[int]]:
    """Per span, the indices (increasing) of the round(fraction * n) of its n tokens to recompute."""
    from .manifold import ProbeDone

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    layers = cache.shape.num_layers
    if isinstance(probe_layer, bool) or not isinstance(probe_layer, int) or not 0 <= probe_layer < layers:
        raise ValueError(f"probe_layer: expected an int in [0, {layers}), got {probe_layer!r}")
    sizes = [ids.shape[1] for _, ids in spans]
    budgets = [round(fraction * n) for n in sizes]
    if policy == "first" or all(k in (0, n) for k, n in zip(budgets, sizes, strict=True)):
        return [list(range(k)) for k in budgets]
    try:
        cache._recompute_tokens(model, seq, spans, [list(range(n)) for n in sizes], probe=probe_layer)
    except ProbeDone as probe:  # the probe's transaction has undone its writes
        total = probe.scores  # this rank's heads; under tensor parallelism the sum over every rank's heads
        if cache.tensor_parallel is not None:
            total = cache.tensor_parallel.sum(total)
        scores = torch.split(total, sizes)
        return [sorted(torch.topk(s, k).indices.tolist()) for s, k in zip(scores, budgets, strict=True)]
    raise RuntimeError(f"model: its forward did not reach the probe layer {probe_layer}")
