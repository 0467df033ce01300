"""Learnable placement of spliced chunks: the gaps between them as real-valued offsets, learnt by gradient descent.

The first seed document says the offset between fused streams "acts as a learnable parameter" and that the
model should "learn the optimal mapping".  Here that is concrete.  Chunks prefilled once into a ManifoldCache
(`ManifoldCache.prefill`) are laid out one after another, gap `g_i` >= 0 (in positions, a real number) before
chunk i + 1 and gap `g_n` before the query; the query's own tokens follow at whole positions.  In the cache's
coordinates (`gaugecompile.cache.manifold`) an entry of chunk i, whose tokens sit at `stored + shift` inside the
chunk, gets

    delta = shift + start_i - (P - N),    start_i = sum_{j < i} (span_j + g_j),    P = start_{n-1} + span_{n-1} + g_n

where N is the tokens the chunks hold (the view length, where the model rotates the query) and `P - N` the query
frame's shift.  Those deltas are a float tensor with a gradient; `materialize_kv` re-rotates the chunks' keys
by them with d key / d delta exact (`rotation_tangent`), so the negative log-likelihood of an answer given the
placed chunks is differentiable in the gaps, at the cost of one forward and one backward per step.  The pools
are read in place and never written: the chunks stay shareable.

Only relative positions matter, so there is no gap before the first chunk.  `grid_search` is the baseline of
Position Engineering (He et al., 2024), which searches a grid of placeholder counts between prompt segments:
one forward per grid point.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..cache import KVChunk, ManifoldCache
from ..ops.materialize import materialize_kv

__all__ = ["ChunkPlacement", "PlacementRun", "learn_gaps", "grid_search"]


class ChunkPlacement(torch.nn.Module):
    """Chunks of one ManifoldCache in order, with learnable gaps (parameter `gaps`, float64, one per chunk: after
    chunk i, the last one before the query).

    `past(model)` is a transformers cache holding the placed chunks (every layer's keys re-rotated by the
    deltas of the current gaps, with their gradient), on which `model` runs the query; `nll(model, query,
    answer)` is the loss to learn the gaps on.
    """

    def __init__(self, cache: ManifoldCache, chunks: Sequence[KVChunk], gaps: Sequence[float] | None = None) -> None:
        super().__init__()
        if not isinstance(cache, ManifoldCache):
            raise TypeError(f"cache: expected a ManifoldCache, got {type(cache).__name__}")
        chunks = list(chunks)
        if not chunks:
            raise ValueError("chunks: expected at least one KVChunk")
        blocks, counts, shifts, owner = [], [], [], []
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, KVChunk) or chunk.cache is not cache or chunk.freed:
                raise ValueError(f"chunks[{i}]: expected a live KVChunk of this cache")
            p = chunk.pieces
            if (p.a != 0).any():
                raise ValueError(f"chunks[{i}]: a piece starts inside a block (slot {int(p.a[p.a != 0][0])}); "
                                 "placement reads whole-block prefixes, as chunks from ManifoldCache.prefill are")
            blocks += p.phys.tolist()
            counts += p.b.tolist()
            shifts += p.delta.tolist()
            owner += [i] * len(p)
        self.cache = cache
        self.chunks = chunks
        self.num_tokens = sum(counts)
        device = cache.storage.device
        self.register_buffer("spans", torch.tensor([c.span for c in chunks], dtype=torch.float64, device=device),
                             persistent=False)
        self.block_table = torch.tensor([blocks], dtype=torch.int64, device=device)
        self.block_lens = torch.tensor([counts], dtype=torch.int64, device=device)
        self.register_buffer("_shift", torch.tensor(shifts, dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("_owner", torch.tensor(owner, dtype=torch.int64, device=device), persistent=False)
        initial = torch.zeros(len(chunks), dtype=torch.float64) if gaps is None else torch.as_tensor(
            gaps, dtype=torch.float64).clone()
        if initial.shape != (len(chunks),):
            raise ValueError(f"gaps: expected {len(chunks)} gaps (after each chunk), got shape {tuple(initial.shape)}")
        if not torch.isfinite(initial).all() or (initial < 0).any():
            raise ValueError(f"gaps: expected finite gaps >= 0, got {initial.tolist()}")
        self.gaps = torch.nn.Parameter(initial.to(device))

    def starts(self, gaps: torch.Tensor | None = None) -> torch.Tensor:
        """Logical start of each chunk and of the query ([n + 1], float64), the first chunk at 0; at `gaps` (a
        tensor like the parameter) where given, else at the parameter."""
        steps = self.spans + (self.gaps if gaps is None else gaps)
        return torch.cat([steps.new_zeros(1), steps.cumsum(0)])

    def deltas(self, gaps: torch.Tensor | None = None) -> torch.Tensor:
        """The real-valued delta of every table entry ([1, entries], float64, differentiable in the gaps)."""
        starts = self.starts(gaps)
        query_shift = starts[-1] - self.num_tokens
        return (self._shift + starts[self._owner] - query_shift).unsqueeze(0)

    def past(self, model: torch.nn.Module, gaps: torch.Tensor | None = None) -> DynamicCache:
        """A transformers cache holding the placed chunks for `model`'s forward of the query."""
        past = DynamicCache(config=model.config)
        deltas = self.deltas(gaps)
        storage = self.cache.storage
        for layer, rope in enumerate(self.cache.layer_ropes):
            k, v = materialize_kv(storage.k_pools[layer], storage.v_pools[layer], self.block_table, deltas, rope,
                                  self.num_tokens, self.block_lens)
            past.update(k, v, layer)
        return past

    def nll(self, model: torch.nn.Module, query: torch.Tensor, answer: torch.Tensor,
            gaps: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood (nats per token) of `answer` ([1, m]) after `query` ([1, q]) given the
        placed chunks: one forward (teacher forcing), differentiable in `gaps`."""
        for name, ids in (("query", query), ("answer", answer)):
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
                got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"{name}: expected token ids of shape [1, n >= 1], got {got}")
        ids = torch.cat([query, answer], dim=1)
        logits = model(input_ids=ids, past_key_values=self.past(model, gaps), use_cache=True).logits
        predicted = logits[0, query.shape[1] - 1 : -1]
        predicted = predicted.to(torch.promote_types(predicted.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(predicted, answer[0].to(predicted.device))


@dataclass
class PlacementRun:
    """What a search did: the gaps it ends with and their loss, every loss it saw, its model calls, its time."""

    method: str
    gaps: list[float]
    loss: float
    losses: list[float] = field(default_factory=list)
    forwards: int = 0
    backwards: int = 0
    seconds: float = 0.0

    def record(self, loss: float, gaps: list[float]) -> None:
        """Count one forward that gave `loss` at `gaps`, keeping the best."""
        self.losses.append(loss)
        self.forwards += 1
        if loss < self.loss:
            self.loss, self.gaps = loss, gaps

    def as_dict(self) -> dict:
        return {"method": self.method, "gaps": self.gaps, "loss": self.loss, "losses": self.losses,
                "forwards": self.forwards, "backwards": self.backwards, "seconds": self.seconds}


def learn_gaps(
    placement: ChunkPlacement, model: torch.nn.Module, query: torch.Tensor, answer: torch.Tensor, *,
    steps: int = 40, lr: float = 4.0, max_gap: float | None = None,
    progress: Callable[[int, float, list[float]], None] | None = None,
) -> PlacementRun:
    """Adam on the gaps, projected onto [0, max_gap] after each step; returns the best gaps seen.

    `lr` is in positions per step (Adam's steps are about `lr` in size whatever the gradient's scale).  The
    model's own parameters get no gradient (they are not touched).  `progress(step, loss, gaps)` is called each
    step.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive step size, got {lr!r}")
    start = time.perf_counter()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimiser = torch.optim.Adam([placement.gaps], lr=lr)
    run = PlacementRun("gradient", placement.gaps.tolist(), float("inf"))
    try:
        for step in range(steps):
            optimiser.zero_grad()
            loss = placement.nll(model, query, answer)
            value = float(loss.detach())
            run.record(value, placement.gaps.tolist())
            if progress is not None:
                progress(step, value, placement.gaps.tolist())
            if step == steps - 1:
                break
            loss.backward()
            run.backwards += 1
            optimiser.step()
            with torch.no_grad():
                placement.gaps.clamp_(min=0.0, max=max_gap)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        placement.gaps.copy_(torch.tensor(run.gaps))
    run.seconds = time.perf_counter() - start
    return run


def grid_search(
    placement: ChunkPlacement, model: torch.nn.Module, query: torch.Tensor, answer: torch.Tensor,
    grid: Sequence[float], *, progress: Callable[[int, float, list[float]], None] | None = None,
) -> PlacementRun:
    """Position Engineering's search: every combination of `grid` values for the gaps, one forward each; leaves
    `placement.gaps` at the best."""
    values = [float(g) for g in grid]
    if not values or any(not g >= 0 for g in values):
        raise ValueError(f"grid: expected gap values >= 0, got {list(grid)}")
    start = time.perf_counter()
    run = PlacementRun("grid", placement.gaps.tolist(), float("inf"))
    with torch.no_grad():
        for index, gaps in enumerate(itertools.product(values, repeat=len(placement.chunks))):
            value = float(placement.nll(model, query, answer, gaps=torch.tensor(gaps, device=placement.gaps.device)))
            run.record(value, list(gaps))
            if progress is not None:
                progress(index, value, list(gaps))
        placement.gaps.copy_(torch.tensor(run.gaps))
    run.seconds = time.perf_counter() - start
    return run
