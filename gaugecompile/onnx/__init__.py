"""ONNX export: each gauge attention becomes one `ai.gauge::RotatedQueryAttention` node, defined
for stock runtimes by a model-local function in standard ops.  `run` executes a file with
onnxruntime after checking the inputs; `CacheStep` turns a transformers step over a ManifoldCache
into a module whose pools, block table, deltas and write slots are inputs, ready for export;
`OrtCausalLM` generates with such a file (transformers' generate() over a ManifoldCache)."""

from .cache_step import CacheStep, PoolView
from .causal_lm import OrtCausalLM
from .export import export_onnx
from .function import DOMAIN, OP_TYPE
from .runtime import run

__all__ = ["CacheStep", "DOMAIN", "OP_TYPE", "OrtCausalLM", "PoolView", "export_onnx", "run"]
