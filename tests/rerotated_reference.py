"""An independently built re-rotating reference for ManifoldCache operations on a real model, in its own dtype.

It keeps, per token, its logical position and, per layer, its unrotated key and its value (float64).  To score the
next tokens it builds a DynamicCache whose keys are re-rotated (in the basis the model really rotates in: its own
rotary buffer, rounded where the model was cast; exact float64 angles) to their positions in a frame where the
query sits at the view length, casts them to the model's dtype, and runs the model with explicit position_ids.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from gaugecompile.bench.baselines import rope_of_model


class RerotatedReference:
    """Tokens as (logical position, per-layer unrotated key [H, D], per-layer value [H, D]) of `model`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.rope = model, rope_of_model(model)
        self.layers = model.config.num_hidden_layers
        self.toks: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []
        self.next = 0

    def _rot(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [H, n, D] rotated by integer `pos` [n] (exact angles, float64)."""
        return self.rope.apply(x.double(), pos[None].expand(x.shape[0], -1))

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run `ids` [1, q] after the current tokens; append them; return logits [q, vocab]."""
        n, q, dtype = len(self.toks), ids.shape[1], self.model.dtype
        dyn = DynamicCache()
        if n:
            pos = torch.tensor([p for p, _, _ in self.toks]) - self.next + n
            for layer in range(self.layers):
                k = torch.stack([t[1][layer] for t in self.toks], 1)
                v = torch.stack([t[2][layer] for t in self.toks], 1)
                dyn.update(self._rot(k, pos)[None].to(dtype), v[None].to(dtype), layer)
        with torch.no_grad():
            out = self.model(input_ids=ids, past_key_values=dyn, position_ids=torch.arange(n, n + q)[None])
        back = -torch.arange(n, n + q)
        for i in range(q):
            ks = [self._rot(out.past_key_values.layers[la].keys[0, :, n:], back)[:, i] for la in range(self.layers)]
            vs = [out.past_key_values.layers[la].values[0, :, n + i].double() for la in range(self.layers)]
            self.toks.append((self.next + i, ks, vs))
        self.next += q
        return out.logits[0]

    def delete(self, start: int, end: int) -> None:
        self.toks = [(p if p < start else p - (end - start), k, v) for p, k, v in self.toks if not start <= p < end]
        self.next = self.next - (end - start) if self.next >= end else min(self.next, start)

    def splice(self, chunk: list, span: int, at: int) -> None:
        moved = [(p if p < at else p + span, k, v) for p, k, v in self.toks]
        self.toks = sorted(moved + [(p + at, k, v) for p, k, v in chunk], key=lambda t: t[0])
        self.next = at + span if at >= self.next else self.next + span

    def chunk(self, start: int, end: int) -> list:
        return [(p - start, k, v) for p, k, v in self.toks if start <= p < end]

    def copy(self) -> RerotatedReference:
        r = RerotatedReference(self.model)
        r.toks, r.next = list(self.toks), self.next
        return r
