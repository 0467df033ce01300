"""Per-sequence mappings and the planner that turns an edit into block reuse plus (rare) copy-on-write.

Coordinates.  Every cached token has a *stored* position (the position it was rotated at when its key
was written, kept per physical slot) and a *logical* position (where it sits in its sequence now).
Inside one mapped block all tokens share `sigma = logical - stored`, so a sequence is an array of
physical blocks with their sigma plus a length; all blocks are full except the last.  An edit is
described as `Pieces` -- runs of slots of physical blocks with their new sigma, held as arrays -- and
`repack` packs them into blocks again: a block made of exactly one piece that starts at slot 0 is reused
as is (reference counted), any other block must be copied (re-rotated to one sigma).

Every step is array arithmetic over the pieces (numpy), never a Python loop over blocks: an edit costs
O(number of blocks) in vectorised work plus a few Python objects, and the copy of the blocks an edit
off block boundaries splits or shifts (for a cut whose length is not a multiple of the block size, every
block after it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["Piece", "Pieces", "SeqMap", "NewBlock", "Plan", "seq_pieces", "split_at", "repack", "block_sources",
           "consecutive_runs"]

_I64 = np.int64


class Piece(NamedTuple):
    """Slots [a, b) of physical block `phys`; their logical position is `stored + shift`."""

    phys: int
    a: int
    b: int
    shift: int


def _ids(values=()) -> np.ndarray:
    return np.asarray(values, dtype=_I64).reshape(-1)


@dataclass(frozen=True)
class Pieces:
    """Pieces in view order (increasing logical positions) as four int64 arrays of equal length."""

    phys: np.ndarray
    a: np.ndarray
    b: np.ndarray
    shift: np.ndarray

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
        return (Piece(*map(int, row)) for row in zip(self.phys, self.a, self.b, self.shift, strict=True))

    def __add__(self, other: Pieces) -> Pieces:
        return Pieces(*(np.concatenate((x, y)) for x, y in zip(self.columns, other.columns, strict=True)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pieces) and all(
            np.array_equal(x, y) for x, y in zip(self.columns, other.columns, strict=True))

    __hash__ = None  # mutable arrays inside

    @property
    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.phys, self.a, self.b, self.shift

    @property
    def tokens(self) -> int:
        return int((self.b - self.a).sum())

    def take(self, index) -> Pieces:
        """The pieces at `index` (a slice or an index array)."""
        return Pieces(*(x[index] for x in self.columns))

    def shifted(self, by: int) -> Pieces:
        return Pieces(self.phys, self.a, self.b, self.shift + by)


@dataclass
class SeqMap:
    """One sequence: physical blocks, per-block sigma (logical - stored), token count, next logical position."""

    blocks: np.ndarray = field(default_factory=_ids)
    sigma: np.ndarray = field(default_factory=_ids)
    length: int = 0
    next_logical: int = 0

    def copy(self) -> SeqMap:
        return SeqMap(self.blocks.copy(), self.sigma.copy(), self.length, self.next_logical)


class NewBlock(NamedTuple):
    """A block to fill by copying: the slots of `sources`, re-rotated to one `sigma`, `n` tokens in all."""

    phys: int | None
    sigma: int
    n: int
    sources: tuple[Piece, ...]


class Plan(NamedTuple):
    """A repacked sequence: per block the reused physical block (-1 where a copy must be made) and sigma."""

    phys: np.ndarray
    sigma: np.ndarray
    length: int

    @property
    def copies(self) -> np.ndarray:
        """Indices of the blocks that must be copied."""
        return np.flatnonzero(self.phys < 0)


def seq_pieces(m: SeqMap, block_size: int) -> Pieces:
    """The sequence as pieces, one per block, with its current sigma."""
    n = len(m.blocks)
    ends = np.full(n, block_size, dtype=_I64)
    if n:
        ends[-1] = m.length - (n - 1) * block_size
    return Pieces(m.blocks.copy(), np.zeros(n, dtype=_I64), ends, m.sigma.copy())


def split_at(pieces: Pieces, logical: int, stored: np.ndarray) -> tuple[Pieces, Pieces]:
    """Split pieces (in increasing logical order) into tokens with logical < `logical` and the rest."""
    if not len(pieces):
        return pieces, pieces
    last = stored[pieces.phys, pieces.b - 1] + pieces.shift
    lo = int(np.searchsorted(last, logical, side="left"))  # first piece whose last token is >= logical
    if lo == len(pieces):
        return pieces, Pieces.empty()
    phys, a, b, shift = (int(x[lo]) for x in pieces.columns)
    cut = a + int(np.searchsorted(stored[phys, a:b] + shift, logical, side="left"))
    left, right = pieces.take(slice(None, lo)), pieces.take(slice(lo + 1, None))
    if cut > a:
        left = left + Pieces.of([Piece(phys, a, cut, shift)])
    if cut < b:
        right = Pieces.of([Piece(phys, cut, b, shift)]) + right
    return left, right


def consecutive_runs(phys: int, a: int, b: int, stored: np.ndarray) -> list[tuple[int, int]]:
    """Split slots [a, b) of `phys` into runs whose stored positions step by exactly 1."""
    pos = stored[phys, a:b]
    breaks = np.nonzero(np.diff(pos) != 1)[0] + 1
    edges = [0, *breaks.tolist(), b - a]
    return [(a + s, a + e) for s, e in zip(edges[:-1], edges[1:], strict=True)]


def _starts(pieces: Pieces) -> np.ndarray:
    n = pieces.b - pieces.a
    return np.cumsum(n) - n


def repack(pieces: Pieces, block_size: int) -> Plan:
    """Pack pieces (in view order) into blocks: reuse where a block is one piece from slot 0, else copy.

    A piece lies inside one physical block, so a block is one whole piece exactly when that piece starts
    at the block's first slot, at its own slot 0, and either fills the block or is the last piece.
    """
    n = pieces.b - pieces.a
    start = _starts(pieces)
    total = int(n.sum())
    n_blocks = -(-total // block_size)
    last = np.arange(len(pieces)) == len(pieces) - 1
    whole = (pieces.a == 0) & (start % block_size == 0) & ((n == block_size) | last)
    phys = np.full(n_blocks, -1, dtype=_I64)
    sigma = np.zeros(n_blocks, dtype=_I64)
    at = start[whole] // block_size
    phys[at], sigma[at] = pieces.phys[whole], pieces.shift[whole]
    copies = np.flatnonzero(phys < 0)
    if copies.size:  # a copied block takes the sigma of the first piece it holds
        first = np.searchsorted(start + n, copies * block_size, side="right")
        sigma[copies] = pieces.shift[first]
    return Plan(phys, sigma, total)


def block_sources(pieces: Pieces, block: int, block_size: int) -> NewBlock:
    """Block `block` of `repack(pieces)` as a copy: the slots of the pieces it holds, at the first one's sigma."""
    n = pieces.b - pieces.a
    start = _starts(pieces)
    lo, hi = block * block_size, (block + 1) * block_size
    first = int(np.searchsorted(start + n, lo, side="right"))
    sources = []
    i = first
    while i < len(pieces) and start[i] < hi:
        a = int(pieces.a[i]) + max(0, lo - int(start[i]))
        b = int(pieces.a[i]) + min(int(n[i]), hi - int(start[i]))
        sources.append(Piece(int(pieces.phys[i]), a, b, int(pieces.shift[i])))
        i += 1
    return NewBlock(None, sources[0].shift, sum(p.b - p.a for p in sources), tuple(sources))
