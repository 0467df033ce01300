"""`gauge::check_rope_basis`: the run-time proof that a cache re-rotates keys in the basis the model rotates
queries in.

Schema:

    check_rope_basis(Tensor query_inv_freq, Tensor cache_inv_freq) -> Tensor

Returns a copy of `cache_inv_freq` (the rewritten attention reads it, so the check cannot be dropped as dead
code) after checking that the two frequency vectors agree to float32 rounding; raises ValueError naming the
cache's RoPE otherwise.  The passes insert it where a rewritten attention's queries are rotated by
`positions * inv_freq` with an inv_freq the graph reads at run time (a buffer of the model) and its keys come
from a cache's `materialize_kv`: a cache built from a config whose rope theta or scaling differs from the
model's would otherwise re-rotate keys by the wrong angles, silently, as soon as an edit makes a delta
nonzero.  One check per graph and pair of vectors, O(rotary_dim).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rope import rounded_from

__all__ = ["check_rope_basis", "same_basis"]

#: Relative agreement required: the model's buffer is usually float32 (a few ulp off), the cache's float64.
RTOL = 1e-5


def same_basis(a: Tensor, b: Tensor) -> bool:
    """Whether two frequency vectors (any float dtype, any device) are one basis to float32 rounding (`RTOL`)."""
    a, b = a.detach().reshape(-1).to("cpu", torch.float64), b.detach().reshape(-1).to("cpu", torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=RTOL, atol=0.0))


@torch.library.custom_op("gauge::check_rope_basis", mutates_args=())
def check_rope_basis(query_inv_freq: Tensor, cache_inv_freq: Tensor) -> Tensor:
    query, cache = query_inv_freq.reshape(-1).double(), cache_inv_freq.reshape(-1).double()
    if not same_basis(query, cache):
        rounded = next((t for t in (torch.bfloat16, torch.float16) if rounded_from(query, cache, t)), None)
        fix = (f"the model's rotary buffer holds the cache's frequencies rounded to {rounded} (a "
               "model cast with .to() or .half()): build the cache from the model, ManifoldCache(model, ...), so "
               "that it follows the model's own basis") if rounded else (
               "build the cache from the model (or its config: its rope theta, scaling and rotary dim)")
        raise ValueError(
            "rope: the model rotates its queries with inv_freq[:3] "
            f"{query[:3].tolist()} ({query.numel()} frequencies), but the cache re-rotates its keys with "
            f"{cache[:3].tolist()} ({cache.numel()}): {fix}"
        )
    return cache_inv_freq.clone()


@check_rope_basis.register_fake
def _fake(query_inv_freq, cache_inv_freq):
    return torch.empty_like(cache_inv_freq)
