"""ManifoldCache: a transformers Cache over a static block pool whose reorganisations are table edits."""

from .chunk import KVChunk
from .manifold import MAX_COW_BLOCKS, ManifoldCache
from .pool import CachePoolFullError
from .rope_config import rope_from_config

__all__ = ["KVChunk", "ManifoldCache", "CachePoolFullError", "MAX_COW_BLOCKS", "rope_from_config"]
