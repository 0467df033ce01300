"""`KVChunk`: a reference-counted handle on a run of cached tokens, to splice at any position."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .mapping import Pieces

if TYPE_CHECKING:
    from .manifold import ManifoldCache

__all__ = ["KVChunk"]


class KVChunk:
    """Tokens of a `ManifoldCache` at relative logical positions [0, span), holding references on their blocks.

    The blocks stay alive (and are never overwritten in place) until `free()`; splicing the chunk into
    sequences shares them again.  Made by `ManifoldCache.chunk` or `ManifoldCache.prefill`, which number their
    chunks in order (`id`): under tensor parallelism the same id names the same chunk on every rank.
    """

    def __init__(self, cache: ManifoldCache, pieces: Pieces, span: int) -> None:
        self.cache = cache
        self.pieces = pieces
        self.span = span
        self.freed = False
        cache.allocator.incref(self.pieces.phys)
        self.id = cache.host.add_chunk(self)

    @property
    def num_tokens(self) -> int:
        return self.pieces.tokens

    def free(self) -> None:
        """Release the chunk's block references (idempotent; under tensor parallelism, src's chunk on every rank)."""
        self.cache.free_chunk(self)

    def __repr__(self) -> str:
        return f"KVChunk(tokens={self.num_tokens}, span={self.span}, pieces={len(self.pieces)}, freed={self.freed})"
