"""Which keys a query sees, and how its scores are capped: the rule every implementation of the op shares.

Query t of q_len sits at view position p = length - q_len + t (the view ends with the queries' own tokens).
`causal` hides the keys after p (bottom-right); a sliding `window` W > 0 hides the keys at p - W and before, so
each query sees at most its last W tokens, itself included -- transformers' sliding-window attention.  Logit
soft-capping (Gemma 2) maps the scaled scores to c * tanh(s / c) before the mask.
"""

from __future__ import annotations

import torch

__all__ = ["hidden_at", "hidden_keys", "soft_capped"]


def hidden_keys(q_len: int, length: int, causal: bool, window: int, device: torch.device) -> torch.Tensor | None:
    """[Q, L] True where a query cannot see a key, or None when every query sees every key."""
    if not causal and not window:
        return None
    return hidden_at(torch.arange(length - q_len, length, device=device)[:, None],
                     torch.arange(length, device=device)[None, :], causal, window)


def hidden_at(query_pos: torch.Tensor, key_pos: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """True where a query at view position `query_pos` cannot see a key at `key_pos` (broadcast together): the
    rule of `hidden_keys` for any positions, as a kernel that walks the view in tiles needs it."""
    hidden = key_pos > query_pos if causal else torch.zeros(torch.broadcast_shapes(query_pos.shape, key_pos.shape),
                                                             dtype=torch.bool, device=key_pos.device)
    return hidden | (key_pos <= query_pos - window) if window else hidden


def soft_capped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): `softcap * tanh(scores / softcap)`, or the scores as they are for 0."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores
