"""ONNX export of a rewritten model: one `ai.gauge::RotatedQueryAttention` node per attention.

Why not `torch.onnx.export(model)` with a custom translation: the exporter always runs the opset
version converter, which inlines every onnxscript function, so the custom node would vanish.
Instead the program is exported with `torch.export`, the gauge passes rewrite it, each
`gauge::rotated_query_attention` is decomposed into `torch.onnx.ops.symbolic_multi_out` (which
the exporter writes verbatim as a custom-domain node; see `decompositions`), the program is
exported with `optimize=False`, and the model-local function that defines the node in standard
ops is appended afterwards.  Stock onnxruntime runs the file through that function; a runtime with a
fused kernel can bind its own implementation to the node instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx.inliner
import torch

from .decompositions import DECOMPOSITIONS
from .function import DOMAIN, MIN_OPSET, function_proto
from .in_place import drop_identity_transposes
from .rope_checks import settle_rope_checks

__all__ = ["export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 20
_TWO_GB = 2**31


def _identity_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input a node returns unchanged, if it is a same-dtype `aten.to.dtype` or an inactive dropout."""
    src = node.args[0] if node.args else None
    if not isinstance(src, torch.fx.Node):
        return None
    if node.target is torch.ops.aten.to.dtype:
        val = src.meta.get("val")
        copy = node.kwargs.get("copy", node.args[3] if len(node.args) > 3 else False)
        return src if isinstance(val, torch.Tensor) and val.dtype == node.args[1] and not copy else None
    if node.target is torch.ops.aten.dropout.default:
        return src if node.args[1] == 0 or not node.args[2] else None
    return None


def _drop_export_noise(gm: torch.fx.GraphModule) -> None:
    """Remove what torch.export keeps and Inductor's post-grad graphs do not, so that it hides no site
    from the passes: same-dtype `aten.to.dtype` and inactive `aten.dropout` (both return their input,
    so dropping them is exact), and `aten._assert_tensor_metadata` checks (static here; they would
    count as extra users of a materialised cache).  The ONNX translation drops all of them anyway."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
        elif (src := _identity_source(node)) is not None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
    gm.recompile()


def _run_gauge_passes(ep: torch.export.ExportedProgram, strict: bool) -> None:
    """Rewrite the materialising attention sites of the exported graph into the gauge op, in place.

    A refused site stays as it was (it then exports in standard ops, see `decompositions`); the
    refusal is reported as a warning, or raised with `strict=True`.
    """
    from ..passes import run_passes

    _drop_export_noise(ep.graph_module)
    report = run_passes(ep.graph_module, strict=strict, run_time_masks=False)  # ONNX has no fallback path
    settle_rope_checks(ep)  # ONNX cannot raise at run time: the RoPE bases are compared now
    for site in report.refused:
        warnings.warn(f"gaugecompile.export_onnx: site left in standard ops: {site.describe()}", stacklevel=3)


class _RollBack(Exception):  # noqa: N818 -- a signal: undo the step just captured
    pass


def _cache_step(model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any] | None):
    """(CacheStep, its inputs) for a model called over a ManifoldCache, the cache left as it was; else None."""
    from ..cache import ManifoldCache
    from .cache_step import CacheStep

    cache = (kwargs or {}).get("past_key_values")
    if not isinstance(cache, ManifoldCache):
        return None
    extra = sorted(set(kwargs) - {"past_key_values", "use_cache"})
    if len(args) != 1 or extra:
        raise ValueError(f"args/kwargs: a model over a ManifoldCache exports from (input_ids,) and "
                         f"past_key_values only, got {len(args)} args and kwargs {extra}")
    captured = []
    try:
        with cache.transaction():
            captured.extend(CacheStep.capture(model, cache, args[0])[:2])
            raise _RollBack
    except _RollBack:  # the transaction has restored the cache; the step's pools were cloned before it ran
        pass
    return captured[0], captured[1]


def _resolve_opset(opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise TypeError(f"opset: expected an int, got {type(opset).__name__}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset: expected a standard opset >= {MIN_OPSET}, got {opset}")
    return opset


def _finish(model: onnx.ModelProto, opset: int, inline: bool) -> onnx.ModelProto:
    """Drop the exporter's identity Transposes (copies in onnxruntime), attach the function that defines the
    node, or inline it; drop the domain import if unused."""
    drop_identity_transposes(model.graph)
    uses_op = any(n.domain == DOMAIN for n in model.graph.node)
    if uses_op:
        ours = function_proto(opset)
        model.functions.extend(ours)
        if inline:
            names = [(f.domain, f.name) for f in ours]
            model = onnx.inliner.inline_selected_functions(model, names, exclude=False)
            kept = [f for f in model.functions if (f.domain, f.name) not in names]
            del model.functions[:]
            model.functions.extend(kept)
    if not uses_op or inline:
        kept = [imp for imp in model.opset_import if imp.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return model


def export_onnx(
    model: torch.nn.Module,
    args: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    inline: bool = False,
    strict: bool = False,
) -> onnx.ModelProto:
    """Export `model(*args, **kwargs)` to `path` with every gauge attention as an `ai.gauge` node.

    A model called with `past_key_values=` a `ManifoldCache` (args: `(input_ids,)`) is exported as the step
    it would run, `CacheStep`'s form: the step is run once eagerly to learn its mapping, then the cache is
    rolled back to exactly what it was, and the file takes input ids, positions, block table, deltas, token
    counts, write slots, the view size and every layer's pools as inputs (`CacheStep.dynamic_shapes` unless
    `dynamic_shapes` is given: a dimension whose example is 1 is specialised, so export with two rows and two
    new tokens for a file that serves every step).

    Pipeline: `torch.export` -> gauge passes -> custom node per `rotated_query_attention` ->
    `torch.onnx.export(optimize=False)` -> identity Transposes dropped -> model-local function defining the
    node in standard ops (opset `opset`, default 20, at least 18).  `inline=True` writes the standard-op body in
    place of each node (no custom domain left).  `dynamic_shapes` is passed to `torch.export`.
    A site the passes refuse is exported in standard ops with a warning; `strict=True` raises
    `gaugecompile.passes.GaugeRefusedError` instead.
    Returns the saved ModelProto; `onnx.checker.check_model(full_check=True)` holds for it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args: expected a tuple of example inputs, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs: expected a mapping or None, got {type(kwargs).__name__}")
    opset = _resolve_opset(opset)
    cache_step = _cache_step(model, args, kwargs)
    if cache_step is not None:
        step, step_args = cache_step
        shapes = dynamic_shapes if dynamic_shapes is not None else step.dynamic_shapes(len(step_args[-1]))
        return export_onnx(step, step_args, path, dynamic_shapes=shapes, opset=opset, inline=inline, strict=strict)

    ep = torch.export.export(model, tuple(args), kwargs=dict(kwargs or {}), dynamic_shapes=dynamic_shapes)
    _run_gauge_passes(ep, strict)
    ep = ep.run_decompositions(DECOMPOSITIONS)
    program = torch.onnx.export(ep, (), dynamo=True, optimize=False, opset_version=opset, verbose=False)
    model_proto = _finish(program.model_proto, opset, inline)
    path = os.fspath(path)
    large = model_proto.ByteSize() >= _TWO_GB  # protobuf's limit: weights go to a side file
    onnx.save_model(model_proto, path, save_as_external_data=large, location=os.path.basename(path) + ".data")
    onnx.checker.check_model(path, full_check=True)
    return model_proto
