"""`ManifoldCache`: a transformers Cache whose reorganisations are O(blocks) edits of a block table.

Frames.  The model rotates each new key at the position it is given, which for transformers is
`get_seq_length() + i`.  This cache therefore reports a monotonic *frame* counter as its sequence
length (the positions the model has consumed; raised after an edit to at least the longest view, so
masks stay well formed) and stores new keys at stored position `frame + i`.  Each sequence keeps the
logical position of its next token; its query "shift" is `sigma_q = next_logical - frame`, and a block
whose tokens have `logical = stored + sigma_b` is re-rotated by `delta_b = sigma_b - sigma_q`: the
keys land in the query's frame, where relative positions are the logical ones.  With no edits every
delta is 0.

Eagerly `update()` returns `gaugecompile.materialize_kv(...)` of the untouched pools (gather +
re-rotate), so every attention implementation is exact; compiled with the gauge backend that node is
what the passes turn into one rotated-query attention over the pools.

Under torch.compile.  The host bookkeeping of a forward (allocation, copy-on-write, tables) is one
`torch.compiler.disable`d call made from `get_mask_sizes`, which transformers calls before the first
layer, so a compiled forward is: a small graph, the bookkeeping, one graph with every layer's
`materialize_kv` feeding its attention, a small graph.  Lengths reach the graph as tensor sizes (the
frame counter and the view length are the sizes of empty tensors, tables are padded to power-of-two
widths, all marked dynamic), so decode steps do not recompile.  A fresh cache assumes one row there; a
forward with more rows redoes the bookkeeping in update(), inside the layer loop; `new_sequences(rows)`
avoids that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from transformers.cache_utils import Cache

from ..ops.materialize import materialize_kv
from .chunk import KVChunk
from .mapping import NewBlock, Piece, Pieces, SeqMap, block_sources, consecutive_runs, repack, seq_pieces, split_at
from .pool import BlockAllocator
from .rope_config import kv_shape_from_config, rope_from_config
from .storage import BlockStorage

__all__ = ["ManifoldCache", "MAX_COW_BLOCKS", "StepMapping"]

#: An edit may copy at most this many blocks (the blocks an unaligned cut splits).
MAX_COW_BLOCKS = 2


class _Forward(NamedTuple):
    """What the layers of one forward read: tables, the pool slots of the new tokens, the view length
    (as the size of `sizes`, shape [0, length], so that a compiled graph gets a SymInt) and the query length."""

    table: torch.Tensor
    delta: torch.Tensor
    slots: torch.Tensor
    sizes: torch.Tensor
    q: int


class StepMapping(NamedTuple):
    """The mapping one forward used (`ManifoldCache.last_step`): what an exported step takes as inputs."""

    block_table: torch.Tensor
    block_delta: torch.Tensor
    slots: torch.Tensor
    length: int


def _size_carrier(n: int) -> torch.Tensor:
    """An empty tensor of shape [0, n], marked dynamic in dim 1: a length Dynamo traces as a SymInt."""
    t = torch.empty(0, n)
    torch._dynamo.maybe_mark_dynamic(t, 1)
    return t


class ManifoldCache(Cache):
    """Block-pool KV cache with fork/reorder/delete/chunk/splice/set_window as block-table edits.

    `max_tokens` is the total number of tokens all sequences and chunks may hold; the pool gets
    `ceil(max_tokens / block_size) + max_batch_size` blocks (room for one partial block per row).
    Rows of a forward are the sequences in `batch` (creation order; `fork` appends, `free` removes);
    a forward with k times as many rows as sequences forks each sequence k times first, so a prompt
    prefilled once is shared by all beams or samples of a later `generate`.
    """

    is_compileable = False  # generate() must not auto-compile this cache with the default backend

    def __init__(
        self, config, *, max_batch_size: int, max_tokens: int, block_size: int = 16,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__(layers=[])
        for name, value in (("max_batch_size", max_batch_size), ("max_tokens", max_tokens),
                            ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.rope = rope_from_config(config)
        self.shape = kv_shape_from_config(config)
        if dtype is None:
            dtype = getattr(config, "dtype", None)
            dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        num_blocks = -(-max_tokens // block_size) + max_batch_size
        self.allocator = BlockAllocator(num_blocks)
        self.storage = BlockStorage(
            self.shape.num_layers, num_blocks, block_size, self.shape.num_kv_heads, self.shape.head_dim,
            self.rope, dtype, torch.device(device or "cpu"),
        )
        self._seqs: dict[int, SeqMap] = {}
        self._batch: list[int] = []
        self._next_id = 0
        self._frame_sizes = torch.empty(0, 0)
        self._window: tuple[int, int] | None = None
        self.peak_blocks_in_use = 0
        self._fwd: _Forward | None = None
        #: The mapping the most recent forward used (block table, deltas, pool slots written, view length).
        self.last_step: StepMapping | None = None

    # ----------------------------------------------------------------- accounting and views
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    @property
    def blocks_in_use(self) -> int:
        return self.allocator.blocks_in_use

    @property
    def bytes_per_block(self) -> int:
        return self.storage.bytes_per_block

    @property
    def sequences(self) -> tuple[int, ...]:
        """Ids of all live sequences."""
        return tuple(self._seqs)

    @property
    def batch(self) -> tuple[int, ...]:
        """Sequence ids of the rows of the next forward, in row order."""
        return tuple(self._batch)

    @property
    def k_pools(self) -> list[torch.Tensor]:
        return self.storage.k_pools

    @property
    def v_pools(self) -> list[torch.Tensor]:
        return self.storage.v_pools

    def seq_len(self, seq: int) -> int:
        """Tokens in the view of `seq`."""
        return self._get(seq).length

    def positions(self, seq: int) -> list[int]:
        """Logical position of every token in the view of `seq` (O(tokens); for inspection and tests)."""
        m = self._get(seq)
        out: list[int] = []
        for p in seq_pieces(m, self.block_size):
            out.extend((self.storage.stored[p.phys, p.a:p.b] + p.shift).tolist())
        return out

    def next_position(self, seq: int) -> int:
        """Logical position the next token of `seq` will take."""
        return self._get(seq).next_logical

    def mapping(self, seq: int) -> tuple[list[int], list[int]]:
        """(physical blocks, per-block delta in the frame of the next query) of `seq`."""
        m = self._get(seq)
        return m.blocks.tolist(), (m.sigma - (m.next_logical - self._frame)).tolist()

    # ----------------------------------------------------------------- transformers Cache API
    @property
    def _frame(self) -> int:
        return self._frame_sizes.shape[1]

    @_frame.setter
    def _frame(self, value: int) -> None:
        if value != self._frame_sizes.shape[1]:
            self._frame_sizes = _size_carrier(value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The frame counter: positions the model has consumed (what it rotates the next token at).

        Read from the size of a tensor, so that a compiled model sees a dynamic SymInt, not a constant.
        """
        return self._frame_sizes.shape[1]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset): the view plus the query; offset puts the query's frame after the view.

        transformers asks this once per forward before any layer runs, so this is where a forward does its
        host bookkeeping (`_begin_forward`, assuming one row per sequence of the batch): the
        graph break of a compiled model then falls before the layers, and every layer's attention is
        traced in one graph with its `materialize_kv`.  Both sizes come from tensor sizes (SymInts).
        """
        if self._fwd is None:
            frame = self._frame_sizes.shape[1]  # what get_seq_length() gave this forward's queries
            # A fresh cache does not know its rows yet: assume one (generate() on one prompt).  A forward with
            # more rows redoes the bookkeeping in update(), inside the layer loop (compiled: per-layer graphs
            # from then on), so batches should open their rows with new_sequences(n) first.
            self._begin_forward(len(self._batch) or 1, query_length)
        else:
            frame = self._frame_sizes.shape[1] - self._fwd.q
        # offset = frame before + query - view: the mask is kv <= q_idx + view - query in terms of the sizes the
        # queries' offset was read from, so a compiled graph can prove it causal (the frame after the bookkeeping
        # would be an unrelated symbol)
        sizes = self._fwd.sizes
        return sizes.shape[1], frame + query_length - sizes.shape[1]

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return len(self._batch) if self._batch else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        old = list(self._batch)
        self.reorder_ids([old[i] for i in rows])
        for seq in old:
            self.free(seq)

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last `-tokens_to_remove` tokens of every row (transformers' convention: <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove: expected <= 0 (tokens to drop from the end), got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0:
            return
        for seq in self._batch:
            m = self._seqs[seq]
            if n > m.length:
                raise ValueError(f"tokens_to_remove: sequence {seq} has only {m.length} tokens")
        for seq in self._batch:
            m = self._seqs[seq]
            self.delete(seq, self.positions(seq)[m.length - n], m.next_logical)
        self._frame = max(self._frame - n, self._longest())

    def reset(self) -> None:
        self._fwd = None
        for seq in list(self._seqs):
            self.free(seq)
        self._frame = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new K/V ([batch, kv_heads, q, head_dim]) into the pools; return the materialised view."""
        if layer_idx == 0 and (self._fwd is None or key_states.shape[0] != len(self._batch)):
            self._begin_forward(key_states.shape[0], key_states.shape[2])
        table, delta, slots, sizes, _ = self._fwd
        k_pool, v_pool = self.storage.k_pools[layer_idx], self.storage.v_pools[layer_idx]
        k_flat, v_flat = k_pool.view(-1, *k_pool.shape[2:]), v_pool.view(-1, *v_pool.shape[2:])
        k_flat.index_copy_(0, slots, key_states.transpose(1, 2).reshape(-1, *k_pool.shape[2:]).to(k_pool.dtype))
        v_flat.index_copy_(0, slots, value_states.transpose(1, 2).reshape(-1, *v_pool.shape[2:]).to(v_pool.dtype))
        k, v = materialize_kv(k_pool, v_pool, table, delta, self.rope, sizes.shape[1])
        if layer_idx == self.shape.num_layers - 1:
            self._fwd = None
            if self._window is not None:
                self._end_forward()
        return k.to(key_states.dtype), v.to(value_states.dtype)

    # ----------------------------------------------------------------- forward bookkeeping (host)
    @torch.compiler.disable
    def _begin_forward(self, rows: int, q: int) -> None:
        """Once per forward: place the new tokens (copy-on-write of shared/misaligned last blocks) and build tables.

        Called again by update() when the forward turns out to have more rows than `get_mask_sizes` assumed
        (the first step of beams over a prefilled prompt): the tokens placed then are rolled back first.
        """
        if self._fwd is not None:
            placed, self._fwd = self._fwd.q, None
            self.crop(-placed)
        if rows > self.max_batch_size:
            raise ValueError(f"batch: {rows} rows exceed max_batch_size={self.max_batch_size}")
        if not self._batch:
            self._batch = [self._new_seq(SeqMap()) for _ in range(rows)]
        elif rows != len(self._batch):
            if rows % len(self._batch):
                raise ValueError(
                    f"batch: the forward has {rows} rows but the cache has {len(self._batch)} sequences in its batch "
                    "(expected the same number or a multiple of it)"
                )
            self._repeat_interleave(rows // len(self._batch))
        self._common_length()
        bs = self.block_size
        plans, needed = [], 0
        for seq in self._batch:
            m = self._seqs[seq]
            sq = m.next_logical - self._frame
            r = m.length % bs
            cow = r > 0 and (self.allocator.refcount[m.blocks[-1]] > 1 or m.sigma[-1] != sq)
            fresh = -(-(r + q) // bs) - (1 if r else 0)
            plans.append((m, sq, r, cow, fresh))
            needed += fresh + cow
        self.allocator.require(needed, f"appending {q} tokens to {rows} sequences")

        copies: list[tuple[int, NewBlock]] = []
        released: list[int] = []  # released after the copies read them
        slots: list[int] = []
        for m, sq, r, cow, fresh in plans:
            if cow:
                old = int(m.blocks[-1])
                (new,) = self.allocator.allocate(1)
                copies.append((new, NewBlock(None, sq, r, (Piece(old, 0, r, int(m.sigma[-1])),))))
                m.blocks = np.append(m.blocks[:-1], new)  # new arrays: a SeqMap's arrays are never written in place
                m.sigma = np.append(m.sigma[:-1], sq)
                released.append(old)
            if fresh:
                m.blocks = np.concatenate((m.blocks, self.allocator.allocate(fresh)))
                m.sigma = np.concatenate((m.sigma, np.full(fresh, sq, dtype=np.int64)))
            pos = np.arange(m.length, m.length + q)
            phys, offset = m.blocks[pos // bs], pos % bs
            slots.append(phys * bs + offset)
            self.storage.stored[phys, offset] = self._frame + np.arange(q)
            m.length += q
            m.next_logical += q
        self.storage.copy_blocks(copies)
        self.allocator.decref(released)
        self._frame += q  # views grew by q too; the frame must not move otherwise inside a forward
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        table, delta = self._tables()
        slots_t = torch.from_numpy(np.concatenate(slots)).to(self.storage.device)
        length = self._common_length()
        self._fwd = _Forward(table, delta, slots_t, _size_carrier(length), q)
        self.last_step = StepMapping(table, delta, slots_t, length)

    @torch.compiler.disable
    def _end_forward(self) -> None:
        if self._window is not None:
            for seq in self._batch:
                self._apply_window(seq)
            self._touch()

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block table and deltas of the batch, padded to a power-of-two width >= 2 (marked dynamic)."""
        width = 1 << max(1, (max(len(self._seqs[s].blocks) for s in self._batch) - 1).bit_length())
        table = np.zeros((len(self._batch), width), dtype=np.int64)
        delta = np.zeros((len(self._batch), width), dtype=np.int64)
        for row, seq in enumerate(self._batch):
            m = self._seqs[seq]
            table[row, : len(m.blocks)] = m.blocks
            delta[row, : len(m.blocks)] = m.sigma - (m.next_logical - self._frame)
        table = torch.from_numpy(table).to(self.storage.device)
        delta = torch.from_numpy(delta).to(self.storage.device)
        torch._dynamo.maybe_mark_dynamic(table, 1)
        torch._dynamo.maybe_mark_dynamic(delta, 1)
        return table, delta

    def _common_length(self) -> int:
        lengths = [self._seqs[s].length for s in self._batch]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"batch: every sequence of a forward must have the same view length, got lengths {lengths} "
                f"for sequences {self._batch}"
            )
        return lengths[0] if lengths else 0

    # ----------------------------------------------------------------- sequence operations
    def fork(self, seq: int, n: int) -> list[int]:
        """`n` new sequences sharing every block of `seq` (appended to the batch)."""
        m = self._get(seq)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        ids = []
        for _ in range(n):
            self.allocator.incref(m.blocks)
            ids.append(self._new_seq(m.copy()))
        self._batch.extend(ids)
        return ids

    def new_sequences(self, n: int) -> list[int]:
        """`n` new empty sequences, appended to the batch.

        A forward on an empty batch learns its row count only in the first layer's update(), so a compiled
        model breaks its graph there (inside the layer loop, which makes Dynamo trace each layer on its
        own); opening the rows first moves that bookkeeping before the layers.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        if len(self._batch) + n > self.max_batch_size:
            raise ValueError(f"n: {len(self._batch)} + {n} rows exceed max_batch_size={self.max_batch_size}")
        ids = [self._new_seq(SeqMap()) for _ in range(n)]
        self._batch.extend(ids)
        return ids

    def set_batch(self, seqs: Sequence[int]) -> None:
        """Choose which live sequences (in row order) the next forward runs; they must have equal view lengths."""
        seqs = [int(s) for s in seqs]
        for s in seqs:
            self._get(s)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs: expected distinct sequence ids, got {seqs}")
        self._batch = seqs

    def reorder(self, beam_idx: torch.Tensor | Sequence[int]) -> None:
        """Row i of the batch takes the content of row `beam_idx[i]` (beam search); blocks are shared, not copied."""
        idx = [int(i) for i in torch.as_tensor(beam_idx).reshape(-1).tolist()]
        if len(idx) != len(self._batch) or any(not 0 <= i < len(self._batch) for i in idx):
            raise ValueError(f"beam_idx: expected {len(self._batch)} row indices in [0, {len(self._batch)}), got {idx}")
        self.reorder_ids([self._batch[i] for i in idx], rows=list(self._batch))

    def reorder_ids(self, sources: list[int], rows: list[int] | None = None) -> None:
        """Set sequence `rows[i]` (default: new sequences) to a shared copy of `sources[i]`; make `rows` the batch."""
        new = [self._get(s).copy() for s in sources]
        for m in new:
            self.allocator.incref(m.blocks)
        if rows is None:
            rows = [self._new_seq(m) for m in new]
        else:
            for seq, m in zip(rows, new, strict=True):
                self.allocator.decref(self._seqs[seq].blocks)
                self._seqs[seq] = m
        self._batch = list(rows)
        self._touch()

    def free(self, seq: int) -> None:
        """Drop `seq` and release its blocks."""
        m = self._get(seq)
        self.allocator.decref(m.blocks)
        del self._seqs[seq]
        if seq in self._batch:
            self._batch.remove(seq)
        self._touch()

    def delete(self, seq: int, start: int, end: int) -> None:
        """Remove logical tokens [start, end); later tokens move down by end - start (their data does not move)."""
        self._check_range(start, end)
        m = self._get(seq)
        before, rest = split_at(seq_pieces(m, self.block_size), start, self.storage.stored)
        _, after = split_at(rest, end, self.storage.stored)
        nxt = m.next_logical - (end - start) if m.next_logical >= end else min(m.next_logical, start)
        self._commit(seq, before + after.shifted(start - end), nxt, f"delete({seq}, {start}, {end})")

    def chunk(self, seq: int, start: int, end: int) -> KVChunk:
        """A shareable, reference-counted handle on the tokens of `seq` at logical [start, end)."""
        self._check_range(start, end)
        m = self._get(seq)
        _, rest = split_at(seq_pieces(m, self.block_size), start, self.storage.stored)
        inside, _ = split_at(rest, end, self.storage.stored)
        return KVChunk(self, inside.shifted(-start), end - start)

    def splice(self, seq: int, chunk: KVChunk, at: int) -> None:
        """Place `chunk` at logical `at`; tokens at or after `at` move up by its span.

        `at` beyond the end leaves a gap: that attaches a stream at offset `at` (any offset up to 2^46).
        """
        if not isinstance(chunk, KVChunk) or chunk.cache is not self or chunk.freed:
            raise ValueError("chunk: expected a live KVChunk of this cache")
        if not isinstance(at, int) or at < 0:
            raise ValueError(f"at: expected a non-negative int, got {at!r}")
        m = self._get(seq)
        before, after = split_at(seq_pieces(m, self.block_size), at, self.storage.stored)
        pieces = before + chunk.pieces.shifted(at) + after.shifted(chunk.span)
        nxt = at + chunk.span if at >= m.next_logical else m.next_logical + chunk.span
        self._commit(seq, pieces, nxt, f"splice({seq}, chunk, at={at})")

    def set_window(self, sink: int, window: int | None) -> None:
        """StreamingLLM: keep the blocks holding the first `sink` tokens and the fewest recent blocks holding at
        least `window` tokens; kept tokens take consecutive positions (sink from 0, window right after).

        Applied now to every sequence and after every forward; `window=None` turns the policy off.
        """
        if window is None:
            self._window = None
            return
        if not isinstance(sink, int) or sink < 0 or not isinstance(window, int) or window < 1:
            raise ValueError(f"sink/window: expected sink >= 0 and window >= 1 ints, got {sink!r}, {window!r}")
        self._window = (sink, window)
        for seq in list(self._seqs):
            self._apply_window(seq)
        self._touch()

    def prefill(self, model: torch.nn.Module, input_ids: torch.Tensor) -> KVChunk:
        """Run `model` on `input_ids` ([1, n]) alone, at positions 0..n-1, and return its KV as a chunk.

        The chunk attends only to itself; splice it anywhere, in any sequence of this cache.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids: expected shape [1, n], got {tuple(input_ids.shape)}")
        saved = (self._batch, self._frame, self._window)
        self._batch, self._frame, self._window = [], 0, None
        try:
            with torch.no_grad():
                model(input_ids=input_ids, past_key_values=self, use_cache=True)
            (tmp,) = self._batch
            chunk = self.chunk(tmp, 0, self._seqs[tmp].next_logical)
            self.free(tmp)
        finally:
            self._batch, self._frame, self._window = saved
            self._touch()
        return chunk

    # ----------------------------------------------------------------- internals
    def _get(self, seq: int) -> SeqMap:
        if seq not in self._seqs:
            raise ValueError(f"seq: no live sequence {seq!r} (live: {sorted(self._seqs)})")
        return self._seqs[seq]

    @staticmethod
    def _check_range(start: int, end: int) -> None:
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ValueError(f"start/end: expected ints with 0 <= start <= end, got {start!r}, {end!r}")

    def _new_seq(self, m: SeqMap) -> int:
        seq = self._next_id
        self._next_id += 1
        self._seqs[seq] = m
        return seq

    def _longest(self) -> int:
        return max((m.length for m in self._seqs.values()), default=0)

    def _touch(self) -> None:
        """After any change: keep the frame at least the longest view (so kv_offset >= 0), track the peak."""
        self._frame = max(self._frame, self._longest()) if self._seqs else 0
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)

    def _repeat_interleave(self, repeats: int) -> None:
        if repeats < 1:
            raise ValueError(f"repeats: expected a positive int, got {repeats}")
        order = []
        for seq in list(self._batch):
            order.append(seq)
            extra = self.fork(seq, repeats - 1)
            order.extend(extra)
        self._batch = order

    def _commit(self, seq: int, pieces: Pieces, next_logical: int, what: str) -> None:
        """Repack `pieces` as the new mapping of `seq`: check copy budget and pool, then copy, then swap refs."""
        plan = repack(pieces, self.block_size)
        copy_at = plan.copies
        if copy_at.size > MAX_COW_BLOCKS:
            raise ValueError(
                f"{what}: the edit moves tokens off block boundaries and would copy {copy_at.size} blocks; at most "
                f"{MAX_COW_BLOCKS} may be copied (use block-aligned ranges: block_size={self.block_size})"
            )
        self.allocator.require(int(copy_at.size), what)
        blocks = plan.phys.copy()
        self.allocator.incref(blocks[blocks >= 0])
        fresh = self.allocator.allocate(int(copy_at.size))
        blocks[copy_at] = fresh
        self.storage.copy_blocks([(phys, block_sources(pieces, int(j), self.block_size))
                                  for phys, j in zip(fresh, copy_at, strict=True)])
        old = self._seqs[seq]
        self.allocator.decref(old.blocks)
        self._seqs[seq] = SeqMap(blocks, plan.sigma, plan.length, next_logical)
        self._touch()

    def _apply_window(self, seq: int) -> None:
        sink, window = self._window
        m = self._seqs[seq]
        bs = self.block_size
        sink_blocks = min(math.ceil(sink / bs), len(m.blocks))
        recent = m.length - sink_blocks * bs
        evict = max(0, (recent - window) // bs) if recent > 0 else 0
        current = seq_pieces(m, bs)
        kept = current.take(np.r_[0:sink_blocks, sink_blocks + evict:len(current)])
        stored = self.storage.stored
        first, last = stored[kept.phys, kept.a], stored[kept.phys, kept.b - 1]
        broken = np.flatnonzero(last - first != kept.b - kept.a - 1)  # stored positions not stepping by 1
        if broken.size:  # rare (blocks made by copies): split those pieces into consecutive runs
            split = set(broken.tolist())
            runs = []
            for i, p in enumerate(kept):
                spans = consecutive_runs(p.phys, p.a, p.b, stored) if i in split else [(p.a, p.b)]
                runs.extend(Piece(p.phys, a, b, p.shift) for a, b in spans)
            kept = Pieces.of(runs)
            first = stored[kept.phys, kept.a]
        n = kept.b - kept.a
        index = np.cumsum(n) - n  # kept tokens take consecutive positions from 0
        pieces = Pieces(kept.phys, kept.a, kept.b, index - first)
        total = int(n.sum())
        if pieces == current and m.next_logical == total:
            return
        self._commit(seq, pieces, total, f"set_window({sink}, {window}) on sequence {seq}")
