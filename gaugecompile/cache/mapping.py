"""Per-sequence mappings and the planner that turns an edit into block reuse plus (rare) copy-on-write.

Coordinates.  Every cached token has a *stored* position (the position it was rotated at when its key
was written, kept per physical slot) and a *logical* position (where it sits in its sequence now).
A sequence is a list of table entries: a physical block, the tokens it holds for this sequence (slots
[0, n) of the block: an entry may be partial anywhere, not only at the end) and one
`delta = logical - stored` for all of them.  An edit is described as `Pieces` -- runs of slots of
physical blocks with their new delta, held as arrays -- and `repack` turns them into entries again:
a piece that starts at slot 0 of its block is that block, shared (reference counted); a piece that
starts later (the right part of a block an edit splits) is copied to a new block.

Every step is array arithmetic over the pieces (numpy), never a Python loop over blocks: an edit costs
O(number of blocks) in vectorised work plus a few Python objects, and the copy of at most one block per
cut an edit makes off block boundaries -- whatever the number of tokens after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["Piece", "Pieces", "SeqMap", "NewBlock", "Plan", "seq_pieces", "split_at", "repack", "copy_source",
           "plain_copy", "consecutive_runs"]

_I64 = np.int64


class Piece(NamedTuple):
    """Slots [a, b) of physical block `phys`; their logical position is `stored + delta`."""

    phys: int
    a: int
    b: int
    delta: int


def _ids(values=()) -> np.ndarray:
    return np.asarray(values, dtype=_I64).reshape(-1)


@dataclass(frozen=True)
class Pieces:
    """Pieces in view order (increasing logical positions) as four int64 arrays of equal length."""

    phys: np.ndarray
    a: np.ndarray
    b: np.ndarray
    delta: np.ndarray

    @classmethod
    def of(cls, pieces: list[Piece]) -> Pieces:
        cols = np.asarray(pieces, dtype=_I64).reshape(-1, 4)
        return cls(*(cols[:, i].copy() for i in range(4)))

    @classmethod
    def empty(cls) -> Pieces:
        return cls(_ids(), _ids(), _ids(), _ids())

    def __len__(self) -> int:
        return len(self.phys)

    def __iter__(self):
        return (Piece(*map(int, row)) for row in zip(self.phys, self.a, self.b, self.delta, strict=True))

    def __add__(self, other: Pieces) -> Pieces:
        return Pieces(*(np.concatenate((x, y)) for x, y in zip(self.columns, other.columns, strict=True)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pieces) and all(
            np.array_equal(x, y) for x, y in zip(self.columns, other.columns, strict=True))

    __hash__ = None  # mutable arrays inside

    @property
    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.phys, self.a, self.b, self.delta

    @property
    def tokens(self) -> int:
        return int((self.b - self.a).sum())

    def take(self, index) -> Pieces:
        """The pieces at `index` (a slice or an index array)."""
        return Pieces(*(x[index] for x in self.columns))

    def shifted(self, by: int) -> Pieces:
        return Pieces(self.phys, self.a, self.b, self.delta + by)


@dataclass
class SeqMap:
    """One sequence: its table entries (physical block, delta = logical - stored, tokens held: slots [0, n) of
    the block), its token count and its next logical position."""

    blocks: np.ndarray = field(default_factory=_ids)
    delta: np.ndarray = field(default_factory=_ids)
    counts: np.ndarray = field(default_factory=_ids)
    length: int = 0
    next_logical: int = 0

    def copy(self) -> SeqMap:
        return SeqMap(self.blocks.copy(), self.delta.copy(), self.counts.copy(), self.length, self.next_logical)


class NewBlock(NamedTuple):
    """A block to fill by copying: the slots of `sources`, re-rotated to one `delta`, `n` tokens in all."""

    phys: int | None
    delta: int
    n: int
    sources: tuple[Piece, ...]


class Plan(NamedTuple):
    """A repacked sequence: per entry the reused physical block (-1 where a copy must be made), delta and
    token count, the pieces the entries are made of, and the tokens in all."""

    phys: np.ndarray
    delta: np.ndarray
    counts: np.ndarray
    pieces: Pieces
    length: int

    @property
    def copies(self) -> np.ndarray:
        """Indices of the entries that must be copied."""
        return np.flatnonzero(self.phys < 0)


def seq_pieces(m: SeqMap) -> Pieces:
    """The sequence as pieces, one per entry, with its current delta."""
    return Pieces(m.blocks.copy(), np.zeros(len(m.blocks), dtype=_I64), m.counts.copy(), m.delta.copy())


def split_at(pieces: Pieces, logical: int, stored: np.ndarray) -> tuple[Pieces, Pieces]:
    """Split pieces (in increasing logical order) into tokens with logical < `logical` and the rest."""
    if not len(pieces):
        return pieces, pieces
    last = stored[pieces.phys, pieces.b - 1] + pieces.delta
    lo = int(np.searchsorted(last, logical, side="left"))  # first piece whose last token is >= logical
    if lo == len(pieces):
        return pieces, Pieces.empty()
    phys, a, b, delta = (int(x[lo]) for x in pieces.columns)
    cut = a + int(np.searchsorted(stored[phys, a:b] + delta, logical, side="left"))
    left, right = pieces.take(slice(None, lo)), pieces.take(slice(lo + 1, None))
    if cut > a:
        left = left + Pieces.of([Piece(phys, a, cut, delta)])
    if cut < b:
        right = Pieces.of([Piece(phys, cut, b, delta)]) + right
    return left, right


def consecutive_runs(phys: int, a: int, b: int, stored: np.ndarray) -> list[tuple[int, int]]:
    """Split slots [a, b) of `phys` into runs whose stored positions step by exactly 1."""
    pos = stored[phys, a:b]
    breaks = np.nonzero(np.diff(pos) != 1)[0] + 1
    edges = [0, *breaks.tolist(), b - a]
    return [(a + s, a + e) for s, e in zip(edges[:-1], edges[1:], strict=True)]


def repack(pieces: Pieces) -> Plan:
    """One table entry per non-empty piece (in view order): a piece from slot 0 of its block is that block,
    shared (its entry holds slots [0, b)); a piece starting later in its block is copied to slot 0 of a new
    block, at its own delta (a plain copy: nothing is re-rotated).  An edit off block boundaries thus copies
    at most the one block it splits, never the blocks after it."""
    keep = pieces.take(pieces.b > pieces.a)
    phys = np.where(keep.a == 0, keep.phys, -1)
    counts = keep.b - keep.a
    return Plan(phys, keep.delta.copy(), counts, keep, int(counts.sum()))


def plain_copy(piece: Piece) -> NewBlock:
    """A new block holding `piece`'s slots from slot 0, at the piece's own delta (nothing is re-rotated)."""
    return NewBlock(None, piece.delta, piece.b - piece.a, (piece,))


def copy_source(plan: Plan, entry: int) -> NewBlock:
    """Entry `entry` of `plan` as a copy of its piece."""
    (piece,) = plan.pieces.take(slice(entry, entry + 1))
    return plain_copy(piece)
