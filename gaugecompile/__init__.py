"""gaugecompile: rotated-query attention over static KV block pools, found and rewritten by torch.compile.

Importing this package registers the `gauge::rotated_query_attention`, `gauge::materialize_kv` and
`gauge::rotated_query_attention_masked` ops. Parts that need transformers or onnx load on first use, so
`import gaugecompile` stays light.
"""

import importlib

from .explain import ExplainReport, explain  # eager: a lazy name would be shadowed by the submodule
from .ops import materialize_kv, reference_attention, rotated_query_attention  # registers every gauge:: op
from .rope import RopeSpec

# public name -> module that defines it (imported on first access)
_LAZY = {
    "ManifoldCache": "gaugecompile.cache",
    "KVChunk": "gaugecompile.cache",
    "CachePoolFullError": "gaugecompile.cache",
    "export_onnx": "gaugecompile.onnx",
}

__all__ = [
    "RopeSpec", "ExplainReport", "explain", "materialize_kv", "rotated_query_attention", "reference_attention", *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gaugecompile' has no attribute {name!r}")
