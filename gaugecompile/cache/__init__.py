"""ManifoldCache: a transformers Cache over a static block pool whose reorganisations are table edits."""

from .chunk import KVChunk
from .manifold import ManifoldCache
from .pool import CachePoolFullError
from .rope_config import rope_from_config

__all__ = ["KVChunk", "ManifoldCache", "CachePoolFullError", "rope_from_config"]
