"""The sequence edits of a `ManifoldCache` as O(blocks) changes of its `HostState`.

Each function validates its arguments before it changes anything and runs inside the caller's transaction
(`transactions.py`), which restores the state if it raises after a change.  Blocks are shared by reference;
only a block an edit cuts off its boundaries is copied (`HostState.commit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .host import HostState, check_int
from .mapping import Pieces, SeqMap, seq_pieces, split_at

__all__ = ["fork", "new_sequences", "set_batch", "reorder_ids", "free", "delete", "select_rows", "crop",
           "span_pieces", "splice", "set_window", "repeat_interleave"]


def fork(host: HostState, seq: int, n: int) -> list[int]:
    """`n` new sequences sharing every block of `seq`, appended to the batch."""
    m = host.get(seq)
    check_int("n", n, 0)
    ids = []
    for _ in range(n):
        host.allocator.incref(m.blocks)
        ids.append(host.new_seq(m.copy()))
    if host.states is not None:
        host.states.alias(ids, [seq] * n)
    host.batch.extend(ids)
    host.touch()
    return ids


def new_sequences(host: HostState, n: int) -> list[int]:
    """`n` new empty sequences, appended to the batch."""
    check_int("n", n, 1)
    if len(host.batch) + n > host.max_batch_size:
        raise ValueError(f"n: {len(host.batch)} + {n} rows exceed max_batch_size={host.max_batch_size}")
    ids = [host.new_seq(SeqMap()) for _ in range(n)]
    host.batch.extend(ids)
    host.touch()
    return ids


def set_batch(host: HostState, seqs: Sequence[int]) -> None:
    """Make the live sequences `seqs` (distinct, in row order) the batch."""
    seqs = [int(s) for s in seqs]
    for s in seqs:
        host.get(s)
    if len(set(seqs)) != len(seqs):
        raise ValueError(f"seqs: expected distinct sequence ids, got {seqs}")
    if len(seqs) > host.max_batch_size:
        raise ValueError(f"seqs: {len(seqs)} rows exceed max_batch_size={host.max_batch_size}")
    host.batch = seqs
    host.touch()


def reorder_ids(host: HostState, sources: list[int], rows: list[int] | None = None) -> None:
    """Set sequence `rows[i]` (default: new sequences) to a shared copy of `sources[i]`; make `rows` the batch."""
    new = [host.get(s).copy() for s in sources]
    if rows is not None:
        for seq in rows:
            host.get(seq)
        if len(rows) != len(new) or len(set(rows)) != len(rows):
            raise ValueError(f"rows: expected {len(new)} distinct live sequences, got {rows}")
    if len(new) > host.max_batch_size:
        raise ValueError(f"sources: {len(new)} rows exceed max_batch_size={host.max_batch_size}")
    for m in new:
        host.allocator.incref(m.blocks)
    if rows is None:
        rows = [host.new_seq(m) for m in new]
    else:
        for seq, m in zip(rows, new, strict=True):
            host.allocator.decref(host.seqs[seq].blocks)
            host.seqs[seq] = m
    if host.states is not None:
        host.states.alias(list(rows), [int(s) for s in sources])
    host.batch = list(rows)
    host.touch()


def free(host: HostState, seq: int) -> None:
    """Drop `seq` and release its blocks."""
    m = host.get(seq)
    host.allocator.decref(m.blocks)
    del host.seqs[seq]
    if host.states is not None:
        host.states.drop(seq)
    if seq in host.batch:
        host.batch.remove(seq)
    host.touch()


def delete(host: HostState, seq: int, start: int, end: int) -> None:
    """Remove logical tokens [start, end) of `seq`; later tokens move down by end - start."""
    host.check_range(start, end)
    m = host.get(seq)
    before, rest = split_at(seq_pieces(m), start, host.storage.stored)
    _, after = split_at(rest, end, host.storage.stored)
    nxt = m.next_logical - (end - start) if m.next_logical >= end else min(m.next_logical, start)
    host.commit(seq, before + after.shifted(start - end), nxt, f"delete({seq}, {start}, {end})")


def select_rows(host: HostState, rows: list[int]) -> None:
    """Keep the batch's rows `rows` (indices, in their new order) as new sequences; free the old ones."""
    old = list(host.batch)
    if any(not 0 <= i < len(old) for i in rows):
        raise ValueError(f"indices: expected row indices in [0, {len(old)}), got {rows}")
    reorder_ids(host, [old[i] for i in rows])
    for seq in old:
        free(host, seq)


def crop(host: HostState, n: int) -> None:
    """Drop the last `n` tokens of every row of the batch."""
    for seq in host.batch:
        if n > host.seqs[seq].length:
            raise ValueError(f"tokens_to_remove: sequence {seq} has only {host.seqs[seq].length} tokens")
    for seq in host.batch if n else ():
        m = host.seqs[seq]
        delete(host, seq, _logical_at(host, m, m.length - n), m.next_logical)


def _logical_at(host: HostState, m: SeqMap, index: int) -> int:
    """The logical position of the view's token number `index` in sequence map `m`."""
    entry = int(np.searchsorted(np.cumsum(m.counts), index, side="right"))
    offset = index - int(m.counts[:entry].sum())
    return int(host.storage.stored[m.blocks[entry], offset] + m.delta[entry])


def span_pieces(host: HostState, seq: int, start: int, end: int) -> Pieces:
    """The tokens of `seq` at logical [start, end), as pieces at relative positions from 0."""
    host.check_range(start, end)
    m = host.get(seq)
    _, rest = split_at(seq_pieces(m), start, host.storage.stored)
    inside, _ = split_at(rest, end, host.storage.stored)
    return inside.shifted(-start)


def splice(host: HostState, seq: int, pieces: Pieces, span: int, at: int) -> None:
    """Place `pieces` (a chunk's, spanning `span` positions) at logical `at` of `seq`; later tokens move up."""
    check_int("at", at, 0, host.max_position)
    m = host.get(seq)
    before, after = split_at(seq_pieces(m), at, host.storage.stored)
    nxt = at + span if at >= m.next_logical else m.next_logical + span
    host.commit(seq, before + pieces.shifted(at) + after.shifted(span), nxt, f"splice({seq}, chunk, at={at})")


def set_window(host: HostState, sink: int, window: int | None) -> None:
    """Turn the StreamingLLM window on (applied now to every sequence) or off (`window=None`)."""
    if window is None:
        host.window = None
        return
    check_int("sink", sink, 0)
    check_int("window", window, 1)
    host.window = (sink, window)
    for seq in list(host.seqs):
        host.apply_window(seq)
    host.touch()


def repeat_interleave(host: HostState, repeats: int) -> None:
    """Each row of the batch followed by `repeats - 1` forks of it (beams or samples of one prompt)."""
    check_int("repeats", repeats, 1)
    if len(host.batch) * repeats > host.max_batch_size:
        raise ValueError(f"repeats: {len(host.batch)} x {repeats} rows exceed max_batch_size={host.max_batch_size}")
    order = []
    for seq in list(host.batch):
        order.append(seq)
        order.extend(fork(host, seq, repeats - 1))
    host.batch = order
