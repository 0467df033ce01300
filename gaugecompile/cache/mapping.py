"""Per-sequence mappings and the planner that turns an edit into block reuse plus (rare) copy-on-write.

Coordinates.  Every cached token has a *stored* position (the position it was rotated at when its key
was written, kept per physical slot) and a *logical* position (where it sits in its sequence now).
Inside one mapped block all tokens share `sigma = logical - stored`, so a sequence is a list of
(physical block, sigma) plus a length; all blocks are full except the last.  An edit is described as
a list of `Piece`s -- runs of slots of physical blocks with their new sigma -- and `repack` packs
them into blocks again: a block made of exactly one piece that starts at slot 0 is reused as is
(reference counted), any other block must be copied (re-rotated to one sigma).  Edits are therefore
O(number of blocks), plus the copy of the few blocks an unaligned edit splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["Piece", "SeqMap", "NewBlock", "seq_pieces", "split_at", "repack", "consecutive_runs"]


class Piece(NamedTuple):
    """Slots [a, b) of physical block `phys`; their logical position is `stored + shift`."""

    phys: int
    a: int
    b: int
    shift: int


@dataclass
class SeqMap:
    """One sequence: physical blocks, per-block sigma (logical - stored), token count, next logical position."""

    blocks: list[int] = field(default_factory=list)
    sigma: list[int] = field(default_factory=list)
    length: int = 0
    next_logical: int = 0

    def copy(self) -> SeqMap:
        return SeqMap(list(self.blocks), list(self.sigma), self.length, self.next_logical)


class NewBlock(NamedTuple):
    """A block of a repacked sequence: `phys` reused, or (phys None) a copy of `sources` at one sigma."""

    phys: int | None
    sigma: int
    n: int
    sources: tuple[Piece, ...]


def seq_pieces(m: SeqMap, block_size: int) -> list[Piece]:
    """The sequence as pieces, one per block, with its current sigma."""
    out = []
    for j, (phys, sig) in enumerate(zip(m.blocks, m.sigma, strict=True)):
        out.append(Piece(phys, 0, min(block_size, m.length - j * block_size), sig))
    return out


def split_at(pieces: list[Piece], logical: int, stored: np.ndarray) -> tuple[list[Piece], list[Piece]]:
    """Split pieces (in increasing logical order) into tokens with logical < `logical` and the rest."""
    lo, hi = 0, len(pieces)
    while lo < hi:  # first piece whose last token is >= logical
        mid = (lo + hi) // 2
        p = pieces[mid]
        if stored[p.phys, p.b - 1] + p.shift < logical:
            lo = mid + 1
        else:
            hi = mid
    if lo == len(pieces):
        return list(pieces), []
    p = pieces[lo]
    cut = p.a + int(np.searchsorted(stored[p.phys, p.a:p.b] + p.shift, logical, side="left"))
    left, right = list(pieces[:lo]), list(pieces[lo + 1:])
    if cut > p.a:
        left.append(Piece(p.phys, p.a, cut, p.shift))
    if cut < p.b:
        right.insert(0, Piece(p.phys, cut, p.b, p.shift))
    return left, right


def shifted(pieces: list[Piece], by: int) -> list[Piece]:
    return [Piece(p.phys, p.a, p.b, p.shift + by) for p in pieces]


def consecutive_runs(phys: int, a: int, b: int, stored: np.ndarray) -> list[tuple[int, int]]:
    """Split slots [a, b) of `phys` into runs whose stored positions step by exactly 1."""
    pos = stored[phys, a:b]
    breaks = np.nonzero(np.diff(pos) != 1)[0] + 1
    edges = [0, *breaks.tolist(), b - a]
    return [(a + s, a + e) for s, e in zip(edges[:-1], edges[1:], strict=True)]


def repack(pieces: list[Piece], block_size: int) -> list[NewBlock]:
    """Pack pieces (in view order) into blocks: reuse where a block is one piece from slot 0, else copy."""
    out: list[NewBlock] = []
    current: list[Piece] = []
    fill = 0

    def close() -> None:
        nonlocal current, fill
        first = current[0]
        if len(current) == 1 and first.a == 0:
            out.append(NewBlock(first.phys, first.shift, fill, (first,)))
        else:
            out.append(NewBlock(None, first.shift, fill, tuple(current)))
        current, fill = [], 0

    for p in pieces:
        a = p.a
        while a < p.b:
            k = min(p.b - a, block_size - fill)
            current.append(Piece(p.phys, a, a + k, p.shift))
            fill += k
            a += k
            if fill == block_size:
                close()
    if fill:
        close()
    return out
