"""ManifoldCache under tensor parallelism: each rank keeps its KV heads' blocks; only edits of the mapping travel.

Under transformers' tensor parallelism (`from_pretrained(path, tp_plan="auto")` under `torchrun`) every rank
runs the same forwards over its share of the KV heads, and a ManifoldCache's pools are sized by the keys of
its first forward, so each rank's pools hold only its heads.  What a reorganisation changes is the mapping
(sequences' block tables, deltas, token counts, block refcounts, the window), and it must be the same on
every rank; KV data never moves between ranks.  Edits come from two places:
- a forward's bookkeeping and generate()'s own cache hooks (`reorder_cache`, `batch_repeat_interleave`,
  `batch_select_indices`, `crop`) are decided by inputs and logits that tensor parallelism already makes
  identical on every rank: they run locally and send nothing;
- an edit the user calls (delete, splice, set_window, fork, free, ...) may be decided on one rank only (a
  request read there, a sampled choice): its arguments are broadcast from rank `src` as one small record and
  every rank applies that record, so all make the same edit or raise the same error (`agreed`).  The other
  ranks' arguments are ignored, as a `broadcast`'s non-source tensors are.
`check_sync()` compares a digest of the mapping across ranks and names the first sequence that differs.
Bytes sent per edit are O(arguments): a few hundred, however many tokens the edit moves.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .chunk import KVChunk

if TYPE_CHECKING:
    from .manifold import ManifoldCache

__all__ = ["TensorParallelSync", "agreed", "local_edit", "mapping_digests"]


@dataclass(frozen=True)
class _ChunkRef:
    """A chunk in a record: chunks are numbered alike on every rank (they are made by agreed edits)."""

    id: int


@dataclass(frozen=True)
class _LocalArg:
    """An argument that stays on each rank (the model: each rank runs its own shard)."""


@dataclass(frozen=True)
class _TensorArg:
    """A tensor argument (ids, beam indices), sent as values and put back on the receiving rank's device."""

    values: np.ndarray


class TensorParallelSync:
    """A ManifoldCache's link to its tensor-parallel group: broadcasts edit records from `src`, sums probe
    scores, and checks that every rank holds the same mapping."""

    def __init__(self, group, src: int) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (call init_process_group first)")
        size = dist.get_world_size(group)
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < size:
            raise ValueError(f"src: expected a rank in [0, {size}) of the group, got {src!r}")
        self.group, self.src, self.size = group, src, size
        self.rank = dist.get_rank(group)
        self.inside = False  # an edit in progress: the edits it calls are part of it

    @contextmanager
    def edit(self) -> Any:
        """The span of one top-level edit: nested edits neither broadcast nor open their own span."""
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def agree(self, cache: ManifoldCache, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Rank src's arguments of edit `name` of `cache`, on every rank (chunks resolved in `cache`)."""
        import torch.distributed as dist

        record = [(name, _encode(args), _encode(kwargs))]
        dist.broadcast_object_list(record, src=dist.get_global_rank(self.group, self.src), group=self.group)
        got, sent_args, sent_kwargs = record[0]
        if got != name:
            raise RuntimeError(f"rank {self.rank} called {name}() while rank {self.src} (src) called {got}(): every "
                               "rank must make the same cache edits in the same order")
        return _decode(sent_args, args, cache), _decode(sent_kwargs, kwargs, cache)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (per-rank shares of a per-token score over all heads)."""
        import torch.distributed as dist

        out = values.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def check(self, cache: ManifoldCache) -> None:
        """Raise if any rank's mapping differs from this rank's, naming the first part that differs.

        One all-reduce of a combined 62-bit digest (max and -min in one tensor); only when it disagrees are
        the per-part digests gathered to say where."""
        import torch.distributed as dist

        parts = mapping_digests(cache)
        total = _digest(b"".join(k.encode() + v.to_bytes(8, "little") for k, v in parts))
        both = torch.tensor([total, -total], dtype=torch.int64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if int(both[0]) == -int(both[1]):
            return
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, dict(parts), group=self.group)
        keys = list(dict.fromkeys(k for p in every for k in p))
        for key in keys:
            values = [p.get(key) for p in every]
            if len(set(values)) > 1:
                differ = [r for r, v in enumerate(values) if v != values[self.src]]
                raise RuntimeError(f"check_sync: {key} differs between rank {self.src} and ranks {differ} "
                                   f"(mapping digests {values})")
        raise RuntimeError("check_sync: the ranks' mapping digests differ")


def _encode(x: Any) -> Any:
    if isinstance(x, KVChunk):
        return _ChunkRef(x.id)
    if isinstance(x, torch.nn.Module):
        return _LocalArg()
    if isinstance(x, torch.Tensor):
        return _TensorArg(x.detach().cpu().numpy())
    if isinstance(x, (list, tuple)):
        return type(x)(_encode(v) for v in x)
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    return x


def _decode(x: Any, local: Any, cache: ManifoldCache) -> Any:
    """Rebuild a record's value; `local` is this rank's own argument at the same place (its model, its device)."""
    if isinstance(x, _LocalArg):
        return local
    if isinstance(x, _TensorArg):
        device = local.device if isinstance(local, torch.Tensor) else torch.device("cpu")
        return torch.from_numpy(x.values).to(device)
    if isinstance(x, _ChunkRef):
        chunk = cache.live_chunk(x.id)
        if chunk is None:
            raise ValueError(f"chunk: this rank holds no live chunk {x.id} (the src rank's argument)")
        return chunk
    if isinstance(x, (list, tuple)):
        same = isinstance(local, (list, tuple)) and len(local) == len(x)
        return type(x)(_decode(v, local[i] if same else None, cache) for i, v in enumerate(x))
    if isinstance(x, dict):
        return {k: _decode(v, local.get(k) if isinstance(local, dict) else None, cache) for k, v in x.items()}
    return x


def _top_level_edit(method: Callable, send: bool) -> Callable:
    """`method` as one edit: under tensor parallelism, with rank src's arguments if `send`; the edits it calls
    are part of it (they neither send nor open their own)."""

    @functools.wraps(method)
    def run(cache, *args, **kwargs):
        sync = cache.tensor_parallel
        if sync is None or sync.inside:
            return method(cache, *args, **kwargs)
        if send:
            args, kwargs = sync.agree(cache, method.__name__, args, kwargs)
        with sync.edit():
            return method(cache, *args, **kwargs)

    return run


def agreed(method: Callable) -> Callable:
    """An edit the user calls: under tensor parallelism rank src's arguments are applied on every rank."""
    return _top_level_edit(method, send=True)


def local_edit(method: Callable) -> Callable:
    """A cache hook generate() calls with arguments identical on every rank: applied locally, nothing sent."""
    return _top_level_edit(method, send=False)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2  # 62 bits: -d fits


def _arrays(*arrays: np.ndarray) -> bytes:
    return b"".join(np.ascontiguousarray(a, dtype=np.int64).tobytes() + b"|" for a in arrays)


def mapping_digests(cache: ManifoldCache) -> list[tuple[str, int]]:
    """(part, digest) of everything the mapping is made of, sequences first (a difference is named by the first
    sequence it shows in): each sequence's blocks, deltas, counts, lengths and its tokens' stored positions,
    each live chunk's pieces, the batch, window and id counters, the pool's refcounts and free list.  Equal
    digests on every rank mean the next forward reads the same tables."""
    cache.settle()
    host = cache.host
    stored = cache.storage.stored
    window = host.window if host.window is not None else (-1, -1)
    alloc = cache.allocator
    parts = []
    for seq, m in host.seqs.items():
        pos = [stored[b, :n] for b, n in zip(m.blocks, m.counts, strict=True)]
        parts.append((f"sequence {seq}", _digest(_arrays(m.blocks, m.delta, m.counts, np.asarray([m.length,
                      m.next_logical]), *pos))))
    for cid, chunk in sorted(host.chunks.items()):
        p = chunk.pieces
        parts.append((f"chunk {cid}", _digest(_arrays(p.phys, p.a, p.b, p.delta, np.asarray([chunk.span,
                      chunk.freed])))))
    parts.append(("the batch", _digest(_arrays(np.asarray(host.batch), np.asarray(window),
                                               np.asarray([host.next_id, host.next_chunk])))))
    parts.append(("the pool's refcounts", _digest(_arrays(alloc.refcount, np.asarray(alloc.free_list)))))
    return parts
