"""A forward's placement on the host: where its new tokens go and the tables its layers read.

`place` opens the rows, allocates the blocks the new tokens go to (copy-on-write of a shared or differently
rotated last block), records their stored positions and returns their pool slots; `tables` and `padded_tables`
build the block table, deltas (each entry's `delta - frame`, see `host.py`) and token counts the op reads, padded
to a power-of-two width so that decode steps reuse one compiled shape.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .edits import repeat_interleave
from .host import HostState
from .mapping import NewBlock, Piece, SeqMap
from .padding import ForwardInputs, RowLayout, row_layouts

__all__ = ["StepMapping", "place", "tables", "padded_tables"]


class StepMapping(NamedTuple):
    """The mapping one forward used (`ManifoldCache.last_step`): what an exported step takes as inputs."""

    block_table: torch.Tensor
    block_delta: torch.Tensor
    block_lens: torch.Tensor
    slots: torch.Tensor
    length: int


def place(host: HostState, rows: int, q: int, inputs: ForwardInputs | None
          ) -> tuple[torch.Tensor, list[RowLayout] | None, list[int]]:
    """Open the rows, allocate (and copy-on-write) the blocks the new tokens of each row go to, grow the views;
    return the flat pool slots of the q new tokens of each row, row-major (a padding token's is a slot of the trash
    block), each row's layout (None: no padding) and its query frame (logical - view position).

    New tokens fill the free slots of a row's last block when its delta is the new tokens' and no padding lies
    between them (a block other entries share is first copied to a fresh one, bytes as they are), then fresh
    blocks; otherwise they start a fresh block and the last one keeps its tokens and its delta: no stored key is
    ever re-rotated (or re-quantized), at the cost of the free slots it leaves."""
    if not host.batch:
        host.batch = [host.new_seq(SeqMap()) for _ in range(rows)]
    elif rows != len(host.batch):
        if rows % len(host.batch):
            raise ValueError(
                f"batch: the forward has {rows} rows but the cache has {len(host.batch)} sequences in its batch "
                "(expected the same number or a multiple of it)"
            )
        repeat_interleave(host, rows // len(host.batch))
    layouts = padded = None
    if inputs is not None:
        layouts = row_layouts(inputs, [host.seqs[s].length for s in host.batch], host.view_length, q)
    if layouts is None:
        if host.padded and (inputs is None or inputs.attention_mask is None):
            raise ValueError("attention_mask: the batch's rows are padded (a view of "
                             f"{host.view_length} columns); expected the 2D mask that pads them")
        view = host.common_length()
        layouts = [RowLayout(0, q, view, False, ()) for _ in host.batch]
    else:
        if host.window is not None:
            raise ValueError("attention_mask: a padded batch under set_window (the window keeps each row's "
                             "blocks by its own tokens, the mask's columns would no longer match)")
        padded = layouts
    bs, allocator = host.block_size, host.allocator
    plans, needed, frames = [], 0, []
    for seq, lay in zip(host.batch, layouts, strict=True):
        m, k = host.seqs[seq], lay.count
        if m.next_logical + k > host.max_position:
            raise ValueError(f"input: sequence {seq} would pass logical position max_position={host.max_position}")
        frame = m.next_logical - lay.position if k else m.next_logical - m.length
        frames.append(frame)
        # a last block with room left, in the new tokens' frame
        r = int(m.counts[-1]) % bs if len(m.counts) and not lay.fresh and m.delta[-1] == frame else 0
        cow = r > 0 and allocator.refcount[m.blocks[-1]] > 1
        fresh = -(-(r + k) // bs) - (1 if r else 0)
        plans.append((seq, m, frame, r, cow, fresh, lay))
        needed += fresh + cow
    allocator.require(needed, f"appending {q} tokens to {rows} sequences")

    copies: list[tuple[int, NewBlock]] = []
    released: list[int] = []  # released after the copies read them
    slots: list[np.ndarray] = []
    trash = host.storage.trash_block * bs
    for seq, m, frame, r, cow, fresh, lay in plans:
        q_row = lay.count
        blocks, delta, counts = m.blocks, m.delta, m.counts  # new arrays below: never written in place
        if cow:
            old = int(blocks[-1])
            (new,) = allocator.allocate(1)
            copies.append((new, NewBlock(None, frame, r, (Piece(old, 0, r, int(delta[-1])),))))
            blocks, delta = np.append(blocks[:-1], new), np.append(delta[:-1], frame)
            released.append(old)
        if fresh:
            blocks = np.concatenate((blocks, allocator.allocate(fresh)))
            delta = np.concatenate((delta, np.full(fresh, frame, dtype=np.int64)))
        row_slots = np.full(q, trash, dtype=np.int64)  # padding tokens go to the trash block
        if q_row:  # the new tokens continue the last block (from slot r) and fill the fresh ones
            first = len(counts) - (1 if r else 0)
            pos = r + np.arange(q_row)
            phys, offset = blocks[first + pos // bs], pos % bs
            filled = np.bincount(pos // bs)  # new tokens per entry they go to
            filled[0] += r
            counts = np.concatenate((counts[:first], filled))
            row_slots[lay.start:lay.start + q_row] = phys * bs + offset
            host.storage.stored[phys, offset] = lay.position + np.arange(q_row)
        slots.append(row_slots)
        host.seqs[seq] = SeqMap(blocks, delta, counts, m.length + q_row, m.next_logical + q_row)
    host.storage.copy_blocks(copies)
    allocator.decref(released)
    host.peak_blocks_in_use = max(host.peak_blocks_in_use, allocator.blocks_in_use)
    return torch.from_numpy(np.concatenate(slots)).to(host.storage.device), padded, frames


def empty_tables(rows: int, entries: int) -> np.ndarray:
    """Zeroed [3, rows, width] block table, deltas and counts, the width a power of two >= 2 holding `entries` (a
    table grows by doubling, so decode steps reuse one compiled shape)."""
    return np.zeros((3, rows, 1 << max(1, (entries - 1).bit_length())), dtype=np.int64)


def tables(host: HostState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table, deltas and token counts of the batch's entries, padded to a power-of-two width >= 2 with
    empty entries (marked dynamic)."""
    out = empty_tables(len(host.batch), max(len(host.seqs[s].blocks) for s in host.batch))
    view = host.common_length()
    for row, seq in enumerate(host.batch):
        m = host.seqs[seq]
        out[:, row, :len(m.blocks)] = m.blocks, m.delta - (m.next_logical - view), m.counts
    return _tensors(host, out)


def padded_tables(host: HostState, layouts: list[RowLayout], frames: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tables of a padded forward, in the mask's columns: each row's entries (deltas in its own query frame
    `frames[row]`), with every run of padding a run of entries of up to a block's tokens on the pad block.

    A run of real tokens must consist of whole entries (padding falls between entries, as `place` keeps it); a
    mask whose padding cuts an entry is refused, naming it."""
    bs, pad = host.block_size, host.storage.pad_block
    rows = []
    for row, (seq, lay, frame) in enumerate(zip(host.batch, layouts, frames, strict=True)):
        m = host.seqs[seq]
        ends = np.cumsum(m.counts)
        parts, used, entry = [], 0, 0
        for real, n in lay.runs:
            if not real:
                counts = np.full(-(-n // bs), bs, dtype=np.int64)
                counts[-1] = n - bs * (len(counts) - 1)
                parts.append(np.stack([np.full_like(counts, pad), np.zeros_like(counts), counts]))
                continue
            stop = int(np.searchsorted(ends, used + n)) + 1
            if stop > len(ends) or ends[stop - 1] != used + n:
                raise ValueError(f"attention_mask: row {row}'s padding cuts its cached tokens after token "
                                 f"{used + n}, inside a table entry (padding must keep the columns it had)")
            parts.append(np.stack([m.blocks[entry:stop], m.delta[entry:stop] - frame, m.counts[entry:stop]]))
            used, entry = used + n, stop
        rows.append(np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64))
    out = empty_tables(len(rows), max(r.shape[1] for r in rows))
    for row, t in enumerate(rows):
        out[:, row, :t.shape[1]] = t
    return _tensors(host, out)


def _tensors(host: HostState, host_tables: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[3, rows, width] host tables as the forward's tensors on the pools' device, width marked dynamic."""
    out = tuple(torch.from_numpy(t).to(host.storage.device) for t in host_tables)
    for t in out:
        torch._dynamo.maybe_mark_dynamic(t, 1)
    return out
