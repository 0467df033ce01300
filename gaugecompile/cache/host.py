"""`HostState`: the mapping a `ManifoldCache` keeps on the host, and its invariants.

The sequences (each a `SeqMap` of table entries), the batch (the rows of the next forward), the view length (the
size of a tensor, so that a compiled graph reads a SymInt), the StreamingLLM window, the chunks and the block
allocator and storage they refer to.  Edits (`edits.py`), the forward's placement (`forward.py`) and transactions
(`transactions.py`) all work on this object; the pools' tensors are written only by the layers (`layers.py`).

Coordinates.  A table entry's tokens sit at `logical = stored + delta` (`mapping.py`); a row's queries at view
position p have logical `p + frame`, `frame = next_logical - view length`.  A forward's tables hold each entry's
`delta - frame`: the rotation, in positions, that brings its keys into the query's frame (0 without edits).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ..rope import MAX_ABS_DELTA
from .mapping import Piece, Pieces, SeqMap, consecutive_runs, copy_source, repack, seq_pieces
from .pool import BlockAllocator
from .states import LayerStates, StatesSnapshot
from .storage import BlockStorage

if TYPE_CHECKING:
    from .chunk import KVChunk

__all__ = ["HostState", "HostSnapshot", "check_int", "size_carrier"]


def check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    """Raise ValueError naming `name` unless `value` is an int (not a bool) in [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value >= hi):
        kind = {0: "a non-negative int", 1: "a positive int"}.get(lo, f"an int >= {lo}")
        bound = f" below {hi}" if hi is not None else ""
        raise ValueError(f"{name}: expected {kind}{bound}, got {value!r}")


def size_carrier(n: int) -> torch.Tensor:
    """An empty tensor of shape [0, n], marked dynamic in dim 1: a length Dynamo traces as a SymInt."""
    t = torch.empty(0, n)
    torch._dynamo.maybe_mark_dynamic(t, 1)
    return t


class HostSnapshot(NamedTuple):
    """The host state an operation or a forward restores when it fails (block arrays are never written in place,
    so the maps are copied shallowly; the pools' slots it wrote are unreachable once restored)."""

    seqs: dict[int, SeqMap]
    batch: list[int]
    next_id: int
    view: torch.Tensor
    window: tuple[int, int] | None
    peak: int
    journal: list[tuple]
    mark: int
    pools: tuple[int, ...]  # the layers whose pools existed (a failed first forward drops the ones it made)
    next_chunk: int
    states: StatesSnapshot | None  # a hybrid model's conv/recurrent states
    padded: bool


class HostState:
    """Sequences, batch, view length, window and chunks of a cache, over its allocator and storage."""

    def __init__(self, allocator: BlockAllocator, storage: BlockStorage, states: LayerStates | None, *,
                 block_size: int, max_batch_size: int, max_position: int) -> None:
        self.allocator, self.storage, self.states = allocator, storage, states
        self.block_size, self.max_batch_size, self.max_position = block_size, max_batch_size, max_position
        self.seqs: dict[int, SeqMap] = {}
        self.batch: list[int] = []  # sequence ids of the next forward's rows
        self.next_id = 0
        self.view_sizes = torch.empty(0, 0)  # [0, view length]
        self.padded = False  # the batch's rows sit in a padded view (`padding.py`): its width is kept
        self.window: tuple[int, int] | None = None  # StreamingLLM (sink, window), applied after every forward
        self.peak_blocks_in_use = 0
        self.chunks: weakref.WeakValueDictionary[int, KVChunk] = weakref.WeakValueDictionary()
        self.next_chunk = 0

    @property
    def view_length(self) -> int:
        return self.view_sizes.shape[1]

    def get(self, seq: int) -> SeqMap:
        """The map of live sequence `seq`; ValueError naming `seq` otherwise."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq not in self.seqs:
            raise ValueError(f"seq: no live sequence {seq!r} (live: {sorted(self.seqs)})")
        return self.seqs[seq]

    def new_seq(self, m: SeqMap) -> int:
        seq = self.next_id
        self.next_id += 1
        self.seqs[seq] = m
        return seq

    def add_chunk(self, chunk: KVChunk) -> int:
        """Number `chunk` (creation order: the same id names the same chunk on every tensor-parallel rank)."""
        cid = self.next_chunk
        self.next_chunk += 1
        self.chunks[cid] = chunk
        return cid

    def check_range(self, start: int, end: int) -> None:
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end))
        if not (ok and 0 <= start <= end <= self.max_position):
            raise ValueError(
                f"start/end: expected ints with 0 <= start <= end <= max_position={self.max_position}, "
                f"got {start!r}, {end!r}"
            )

    def touch(self) -> None:
        """After any change: the view length of the batch (what get_seq_length reports: a padded batch keeps its
        mask's width while it has rows), the peak."""
        n = max((self.seqs[s].length for s in self.batch), default=0)
        self.padded = self.padded and bool(self.batch)
        if self.padded:
            n = max(n, self.view_length)
        if n != self.view_length:
            self.view_sizes = size_carrier(n)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.allocator.blocks_in_use)

    def common_length(self) -> int:
        """The view length every row of the batch shares (an unpadded forward needs one)."""
        lengths = [self.seqs[s].length for s in self.batch]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"batch: every sequence of a forward must have the same view length, got lengths {lengths} "
                f"for sequences {self.batch}"
            )
        return lengths[0] if lengths else 0

    # ----------------------------------------------------------------- snapshots
    def save(self) -> HostSnapshot:
        journal = self.allocator.journal
        return HostSnapshot(
            {s: SeqMap(m.blocks, m.delta, m.counts, m.length, m.next_logical) for s, m in self.seqs.items()},
            list(self.batch), self.next_id, self.view_sizes, self.window, self.peak_blocks_in_use, journal,
            len(journal), self.storage.allocated, self.next_chunk,
            self.states.save() if self.states is not None else None, self.padded,
        )

    def restore(self, saved: HostSnapshot) -> None:
        self.allocator.undo(saved.journal[saved.mark:])
        del saved.journal[saved.mark:]
        self.seqs, self.batch, self.next_id = saved.seqs, saved.batch, saved.next_id
        self.view_sizes, self.window = saved.view, saved.window
        self.peak_blocks_in_use, self.next_chunk, self.padded = saved.peak, saved.next_chunk, saved.padded
        self.storage.release(tuple(i for i in self.storage.allocated if i not in saved.pools))
        if self.states is not None:
            self.states.restore(saved.states)

    # ----------------------------------------------------------------- rewriting one sequence
    def commit(self, seq: int, pieces: Pieces, next_logical: int, what: str) -> None:
        """Repack `pieces` as the new mapping of `seq`: check bounds and pool, then copy, then swap refs.

        A piece that starts inside its block (an edit split it) is copied to a fresh block; the rest are shared.
        """
        if next_logical > self.max_position:
            raise ValueError(f"{what}: the next position {next_logical} would pass max_position={self.max_position}")
        plan = repack(pieces)
        copy_at = plan.copies
        largest = _largest_rotation(plan, next_logical)
        if largest >= MAX_ABS_DELTA:
            raise ValueError(f"{what}: a key would be rotated by {largest} positions; deltas stay below 2^31")
        self.allocator.require(int(copy_at.size), what)
        blocks = plan.phys.copy()
        self.allocator.incref(blocks[blocks >= 0])
        fresh = self.allocator.allocate(int(copy_at.size))
        blocks[copy_at] = fresh
        self.storage.copy_blocks([(phys, copy_source(plan, int(j))) for phys, j in zip(fresh, copy_at, strict=True)])
        self.allocator.decref(self.seqs[seq].blocks)
        self.seqs[seq] = SeqMap(blocks, plan.delta, plan.counts, plan.length, next_logical)
        self.padded = False  # an edit of the tokens: the rows' views are their tokens again, unpadded
        self.touch()

    def apply_window(self, seq: int) -> None:
        """Keep the sink blocks and the fewest recent blocks holding the window's tokens of `seq`, at consecutive
        positions from 0 (StreamingLLM)."""
        sink, window = self.window
        m = self.seqs[seq]
        held = np.cumsum(m.counts)  # tokens in the first j + 1 entries
        sink_blocks = min(int(np.searchsorted(held, sink, side="left")) + 1 if sink else 0, len(m.blocks))
        after = m.length - held + m.counts  # tokens in entries j.. (the recent part keeps a suffix of them)
        keep_from = sink_blocks + int(np.count_nonzero(after[sink_blocks:] - m.counts[sink_blocks:] >= window))
        current = seq_pieces(m)
        kept = current.take(np.r_[0:sink_blocks, keep_from:len(current)])
        stored = self.storage.stored
        first, last = stored[kept.phys, kept.a], stored[kept.phys, kept.b - 1]
        broken = np.flatnonzero(last - first != kept.b - kept.a - 1)  # stored positions not stepping by 1
        if broken.size:  # rare (blocks made by copies): split those pieces into consecutive runs
            split = set(broken.tolist())
            runs = []
            for i, p in enumerate(kept):
                spans = consecutive_runs(p.phys, p.a, p.b, stored) if i in split else [(p.a, p.b)]
                runs.extend(Piece(p.phys, a, b, p.delta) for a, b in spans)
            kept = Pieces.of(runs)
            first = stored[kept.phys, kept.a]
        n = kept.b - kept.a
        index = np.cumsum(n) - n  # kept tokens take consecutive positions from 0
        pieces = Pieces(kept.phys, kept.a, kept.b, index - first)
        total = int(n.sum())
        if pieces == current and m.next_logical == total:
            return
        self.commit(seq, pieces, total, f"set_window({sink}, {window}) on sequence {seq}")


def _largest_rotation(plan, next_logical: int) -> int:
    """The largest |delta| a repacked sequence rotates by, in the frame of a query at the view length (copies keep
    their delta, so they rotate nothing)."""
    if not len(plan.delta):
        return 0
    return int(np.abs(plan.delta - (next_logical - plan.length)).max())
