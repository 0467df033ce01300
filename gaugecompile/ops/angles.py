"""cos/sin of every block's delta, computed once per forward and shared by the layers.

Every layer of a forward passes the same mapping, so the exact float64 angle reduction
(`gaugecompile.rope.delta_cos_sin`, O(blocks * F)) runs once and its result is reused while the deltas
and frequencies stay equal in value (compared, never assumed from object identity: a cache edits its
tables in place).
"""

from __future__ import annotations

import torch

from ..rope import delta_cos_sin

__all__ = ["block_angles"]

#: The last (block_delta, inv_freq, dtype) -> (cos, sin).
_LAST: list = []


def block_angles(
    block_delta: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """cos/sin of the deltas ([B, width, F] in `dtype`), or (None, None) when every delta is 0."""
    if not bool(block_delta.any()):
        return None, None
    if _LAST:
        (delta, freq, cdt), cos_sin = _LAST[0]
        if (cdt == dtype and delta.shape == block_delta.shape and delta.dtype == block_delta.dtype
                and freq.shape == inv_freq.shape and torch.equal(delta, block_delta) and torch.equal(freq, inv_freq)):
            return cos_sin
    cos_sin = delta_cos_sin(block_delta, inv_freq, dtype)
    _LAST[:] = [((block_delta.detach().clone(), inv_freq.clone(), dtype), cos_sin)]
    return cos_sin
