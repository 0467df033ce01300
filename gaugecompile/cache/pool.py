"""Block allocator with reference counts: which physical KV blocks are free, and who shares the rest.

Undo.  While `journal` is a list, every change is recorded there (what was allocated, which counts went
up, which went down and which blocks that released), and `undo(journal)` reverses the entries exactly,
free-list order included.  The cache opens a journal around each operation and each forward, so a
failure rolls the pool back to the state before it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["BlockAllocator", "CachePoolFullError"]


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    return ids.astype(np.int64, copy=False) if isinstance(ids, np.ndarray) else np.fromiter(ids, dtype=np.int64)


class CachePoolFullError(RuntimeError):
    """Raised before any state changes when an operation needs more free blocks than the pool has."""


class BlockAllocator:
    """Free list + per-block reference counts; a block returns to the free list when its count drops to 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected a positive int, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = np.zeros(num_blocks, dtype=np.int64)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        #: Where changes are recorded for `undo` (None: not recording).
        self.journal: list[tuple] | None = None

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def free_list(self) -> tuple[int, ...]:
        """The free blocks, in the reverse of the order they will be handed out (for inspection and tests)."""
        return tuple(self._free)

    def require(self, n: int, what: str) -> None:
        """Raise CachePoolFullError if fewer than `n` blocks are free (call before changing any state)."""
        if n > len(self._free):
            raise CachePoolFullError(
                f"KV block pool full: {what} needs {n} free blocks, {len(self._free)} of {self.num_blocks} are free "
                "(raise max_tokens, free sequences or chunks, or use set_window)"
            )

    def allocate(self, n: int, what: str = "allocation") -> list[int]:
        """`n` fresh blocks with reference count 1."""
        self.require(n, what)
        ids = [self._free.pop() for _ in range(n)]
        self.refcount[ids] = 1
        self._record("allocate", ids)
        return ids

    def incref(self, ids: Iterable[int] | np.ndarray) -> None:
        ids = _as_ids(ids)
        if ids.size:
            np.add.at(self.refcount, ids, 1)
            self._record("incref", ids)

    def decref(self, ids: Iterable[int] | np.ndarray) -> None:
        ids = _as_ids(ids)
        if not ids.size:
            return
        np.subtract.at(self.refcount, ids, 1)
        counts = self.refcount[ids]
        if (counts < 0).any():
            np.add.at(self.refcount, ids, 1)
            raise AssertionError("block reference count went negative")
        released = np.unique(ids[counts == 0])  # usually few: sort only those
        self._free.extend(int(b) for b in released[::-1])
        self._record("decref", ids, len(released))

    def _record(self, *entry) -> None:
        if self.journal is not None:
            self.journal.append(entry)

    def undo(self, journal: list[tuple]) -> None:
        """Reverse the recorded changes, newest first (the entries must be the newest changes made)."""
        for kind, ids, *rest in reversed(journal):
            if kind == "allocate":
                self.refcount[ids] = 0
                self._free.extend(reversed(ids))
            elif kind == "incref":
                np.subtract.at(self.refcount, ids, 1)
            else:
                (released,) = rest
                if released:
                    del self._free[-released:]
                np.add.at(self.refcount, ids, 1)
