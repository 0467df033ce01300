"""KV-gather detector: how an attention's keys/values were assembled from a cache.

Recognised (keys and values must be assembled the same way):
- `gauge::materialize_kv` (ManifoldCache's gather + re-rotation of a block pool), whole or from a token
  `first` on (a sliding-window layer's view: the keys before its window cut off);
- `cat` of pieces along the sequence (a past cache and new tokens; sink + window + new);
- per piece: `index_select`/advanced indexing on the batch dim by a table (beam reorder),
  a slice along the sequence, and RoPE re-applied to cached keys with one shift per row
  (StreamingLLM-style position shifting), on top of any tensor: a cache input, a static buffer
  written with `index_copy`/`index_put`/`slice_scatter`, or fresh keys.

Every piece becomes a block pool with no copy: `[batch, kv_heads, len, dim]` permuted to
`[num_blocks=batch, block_size=len, kv_heads, dim]`, block table = the row index, delta = the shift.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .fx_utils import AnalysisError, aten, is_call, known_equal, layout_root, shape, val
from .rope_detect import match_rope

MATERIALIZE = torch.ops.gauge.materialize_kv.default
_CACHE_WRITES = (aten.index_copy.default, aten.index_put.default, aten.slice_scatter.default,
                 aten.select_scatter.default, aten.copy.default, aten.scatter.src)


@dataclass
class Piece:
    """One block pool: keys/values [B', Hkv, L, D] (as FX nodes), optional row table and per-row shift."""

    k: fx.Node
    v: fx.Node
    length: int | torch.SymInt
    table: fx.Node | None = None
    shift: fx.Node | None = None  # integer positions, one per row (or one for all)
    inv_freq: fx.Node | None = None
    rotary_dim: int = 2
    interleaved: bool = False
    materialize: fx.Node | None = None  # the materialize_kv node (its args are the pool and mapping)
    first: int | fx.Node = 0  # the first view token kept (a slice of the materialised view), an int or a size node
    kinds: list[str] = field(default_factory=list)


@dataclass
class KVPlan:
    pieces: list[Piece]
    gather_nodes: list[fx.Node]  # must vanish for the rewrite to pay off
    kinds: list[str]
    from_cache: bool  # False: fresh keys only (not a cache site)

    @property
    def label(self) -> str:
        return "+".join(dict.fromkeys(self.kinds)) or "fresh"


def ident_root(node):
    """Walk back through ops that keep every element in place (clone, alias, same-dtype convert)."""
    while is_call(node, aten.clone.default, aten.alias.default, aten.contiguous.default,
                  torch.ops.prims.convert_element_type.default) and val(node).dtype == val(node.args[0]).dtype:
        node = node.args[0]
    return node


def _is_cache_source(node) -> bool:
    root = layout_root(node)
    return isinstance(root, fx.Node) and (root.op in ("placeholder", "get_attr") or is_call(root, *_CACHE_WRITES))


def _seq_cat(node) -> list[fx.Node] | None:
    if not is_call(node, aten.cat.default):
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    return list(node.args[0]) if dim in (2, -2) and val(node).dim() == 4 else None


def _row_table(node) -> tuple[fx.Node, fx.Node] | None:
    """(source, index) when `node` selects batch rows of `source` by an integer index tensor."""
    if is_call(node, aten.index_select.default) and node.args[1] == 0:
        return node.args[0], node.args[2]
    if is_call(node, aten.index.Tensor) and len(node.args[1]) == 1 and node.args[1][0] is not None:
        idx = node.args[1][0]
        if val(idx).dim() == 1 and not val(idx).is_floating_point() and val(idx).dtype != torch.bool:
            return node.args[0], idx
    return None


def _per_row(rope, k: fx.Node) -> bool:
    """A RoPE that can be a re-rotation: one angle per row (cos [.., 1, 1, F]) of keys laid out as `k` is.
    Otherwise (per-token positions, another layout) it is the rotation that made these keys, kept as it is."""
    cos_shape = tuple(val(rope.cos).shape)
    per_row = len(cos_shape) >= 2 and known_equal(cos_shape[-2], 1) and (
        len(cos_shape) < 3 or known_equal(cos_shape[-3], 1))
    return per_row and known_equal(shape(rope.x), shape(k))


def _piece(k: fx.Node, v: fx.Node, plan: KVPlan) -> Piece:
    length = shape(k)[2]
    if not known_equal(shape(v)[2], length):
        raise AnalysisError("keys and values pieces have different lengths")
    piece = Piece(k, v, length)
    rope = match_rope(k)
    if rope is not None and rope.cos is not None and _is_cache_source(rope.x) and _per_row(rope, k):
        angle = rope.angle()
        if angle is None or angle.kind != "inv_freq":
            reason = "dynamic inv_freq (it depends on the sequence length)" if angle and angle.kind == "dynamic" \
                else f"cos/sin of the re-rotation come from a {angle.kind if angle else 'unknown'} source"
            raise AnalysisError(f"cached keys are re-rotated but {reason}")
        if angle.factor != 1.0:
            raise AnalysisError(f"cached keys are re-rotated with a scaled cos/sin (factor {angle.factor})")
        numel = val(angle.positions).numel()
        if not (known_equal(numel, 1) or known_equal(numel, shape(k)[0])):
            raise AnalysisError("the re-rotation shift is not one integer per row")
        piece.k, piece.shift, piece.inv_freq = rope.x, angle.positions, angle.inv_freq
        piece.rotary_dim, piece.interleaved = rope.rotary_dim, rope.interleaved
        piece.kinds.append(f"rerotation({rope.kind})")
        plan.gather_nodes.append(rope.out)
    k_rows, v_rows = _row_table(ident_root(piece.k)), _row_table(ident_root(piece.v))
    if (k_rows is None) != (v_rows is None) or (k_rows and k_rows[1] is not v_rows[1]):
        raise AnalysisError("keys and values are gathered by different tables")
    if k_rows is not None:
        plan.gather_nodes += [ident_root(piece.k), ident_root(piece.v)]
        piece.k, piece.v, piece.table = k_rows[0], v_rows[0], k_rows[1]
        if not known_equal(shape(piece.k)[1:], shape(k)[1:]):
            raise AnalysisError("the row gather is not laid out as [batch, kv_heads, len, head_dim]")
        piece.kinds.append("index_select")
    for node in (piece.k, piece.v):
        if is_call(layout_root(node), *_CACHE_WRITES):
            piece.kinds.append(f"static-cache({layout_root(node).target.__name__.split('.')[0]})")
            break
    if piece.kinds or _is_cache_source(piece.k):
        plan.from_cache = True
    plan.kinds += piece.kinds
    return piece


def _view_tail(node) -> tuple[fx.Node, int | fx.Node] | None:
    """(source, first) when `node` is `source[:, :, first:]`: a slice along the sequence to its end."""
    if not (is_call(node, aten.slice.Tensor) and len(node.args) > 1 and node.args[1] in (2, -2)):
        return None
    source, _, start, end, step = (*node.args, *(None, None, 0, None, 1)[len(node.args):])  # slice's defaults
    length = shape(source)[2]
    to_end = end is None or end == torch.iinfo(torch.int64).max or (
        isinstance(end, int) and isinstance(length, int) and end >= length)
    return (source, 0 if start is None else start) if to_end and step == 1 else None


def _materialized(k: fx.Node, v: fx.Node) -> tuple[fx.Node, int | fx.Node, list[fx.Node]] | None:
    """(materialize_kv node, first token kept, slice nodes) when k and v are its two views, whole or from one
    token on; None when they are not materialize_kv's."""
    mat_k, mat_v = ident_root(k), ident_root(v)
    first, slices = 0, []
    tail_k, tail_v = _view_tail(mat_k), _view_tail(mat_v)
    if tail_k is not None and tail_v is not None:
        if tail_k[1] != tail_v[1]:
            raise AnalysisError("keys and values of materialize_kv are sliced from different tokens")
        slices, first = [mat_k, mat_v], tail_k[1]
        mat_k, mat_v = ident_root(tail_k[0]), ident_root(tail_v[0])
    if not (mat_k.target is operator.getitem and is_call(mat_k.args[0], MATERIALIZE)):
        return None
    mat = mat_k.args[0]
    if not (mat_v.target is operator.getitem and mat_v.args[0] is mat and mat_k.args[1] == 0 and mat_v.args[1] == 1):
        raise AnalysisError("keys and values come from different materialize_kv calls")
    full_k, full_v = (slices[0].args[0], slices[1].args[0]) if slices else (k, v)
    if not (known_equal(shape(full_k), shape(mat_k)) and known_equal(shape(full_v), shape(mat_v))
            and known_equal(shape(k)[:2], shape(mat_k)[:2]) and known_equal(shape(k)[3:], shape(mat_k)[3:])):
        raise AnalysisError("materialize_kv outputs are reshaped before the attention")
    return mat, first, slices


def plan_kv(k: fx.Node, v: fx.Node) -> KVPlan:
    """Decompose keys/values [B, Hkv, L, D] into block pools; AnalysisError says what does not fit."""
    plan = KVPlan([], [], [], False)
    found = _materialized(k, v)
    if found is not None:
        mat, first, slices = found
        kinds = ["materialize_kv", "window-slice"] if slices else ["materialize_kv"]
        plan.pieces.append(Piece(k, v, shape(k)[2], materialize=mat, first=first, kinds=kinds))
        plan.gather_nodes += [mat, *slices]
        plan.kinds += kinds
        plan.from_cache = True
        return plan
    mat_k, mat_v = ident_root(k), ident_root(v)
    k_parts, v_parts = _seq_cat(mat_k), _seq_cat(mat_v)
    if k_parts is not None or v_parts is not None:
        if k_parts is None or v_parts is None or len(k_parts) != len(v_parts):
            raise AnalysisError("keys and values are concatenated differently")
        plan.gather_nodes += [mat_k, mat_v]
        plan.kinds.append("cat")
        plan.from_cache = True
        parts = [(a, b) for a, b in zip(k_parts, v_parts, strict=True) if not known_equal(shape(a)[2], 0)]
    else:
        parts = [(k, v)]
    for a, b in parts:
        plan.pieces.append(_piece(a, b, plan))
    return plan
