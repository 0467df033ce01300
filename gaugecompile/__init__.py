"""gaugecompile: rotated-query attention over static KV block pools, found and rewritten by torch.compile.

Importing this package registers the `gauge::rotated_query_attention` op.
"""

from .materialize import materialize_kv
from .ops import rotated_query_attention
from .reference import reference_attention
from .rope import RopeSpec

__all__ = ["RopeSpec", "materialize_kv", "rotated_query_attention", "reference_attention"]
__version__ = "0.1.0"
