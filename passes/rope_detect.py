"""RoPE detector: finds `x*cos + rot(x)*sin` (rotate-half or interleaved pairs), complex multiplication
(`view_as_complex(x) * freqs_cis`) and partial rotary (rotate a slice, concatenate the rest), and
traces cos/sin back to `positions * inv_freq` or to a precomputed table read by position.

The pair layout is proven, not guessed: the rotated operand is evaluated on distinct values and
compared with rotate-half / rotate-every-two of the same input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .fx_utils import CONVERTS, AnalysisError, aten, is_call, layout_root, probe_chain, val

_ROT_OPS = frozenset({aten.neg.default, aten.cat.default, aten.stack.default, aten.flatten.using_ints,
                      aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, operator.getitem})
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_TABLE_OPS = (aten.index.Tensor, aten.index_select.default, aten.gather.default, aten.embedding.default)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


@dataclass
class Angle:
    """Where cos/sin come from: `positions * inv_freq` ("inv_freq"), a table by position ("table"),
    or an inv_freq computed inside the graph ("dynamic", e.g. dynamic NTK)."""

    kind: str
    positions: fx.Node | None = None  # integer positions before the float conversion
    inv_freq: fx.Node | None = None
    factor: float = 1.0  # attention scaling applied to cos/sin


@dataclass
class RopeMatch:
    out: fx.Node
    x: fx.Node  # the rotated operand (full width, or the source of the slice for partial rotary)
    cos: fx.Node | None
    sin: fx.Node | None
    rotary_dim: int
    interleaved: bool
    kind: str

    def angle(self) -> Angle | None:
        return trace_angle(self.cos) if self.cos is not None else None


def _mul_operands(node):
    if is_call(node, aten.mul.Tensor) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return [tuple(node.args[:2]), tuple(reversed(node.args[:2]))]
    return []


def _proves(x, r, fn) -> bool:
    try:
        probe_chain(x, r, lambda t, _dims: fn(t), _ROT_OPS)
        return True
    except (AnalysisError, RuntimeError, TypeError, IndexError):
        return False


def _match_pairs(node) -> RopeMatch | None:
    if not is_call(node, aten.add.Tensor) or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    a, b = node.args[:2]
    for m1, m2 in ((a, b), (b, a)):
        for x, cos in _mul_operands(m1):
            for r, sin in _mul_operands(m2):
                if not isinstance(val(x), torch.Tensor) or val(x).shape[-1] % 2:
                    continue
                for fn, interleaved in ((_rotate_half, False), (_rotate_every_two, True)):
                    if _proves(x, r, fn):
                        kind = "interleaved" if interleaved else "rotate-half"
                        return RopeMatch(node, x, cos, sin, int(val(x).shape[-1]), interleaved, kind)
    return None


def _pairs_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], -1, 2)


def _match_complex(node) -> RopeMatch | None:
    """`view_as_real(view_as_complex(x as [..., d/2, 2]) * freqs)`: consecutive elements pair up (interleaved), which
    the probe proves of the layout ops between x and `view_as_complex`."""
    real = layout_root(node)
    if not is_call(real, aten.view_as_real.default) or not is_call(real.args[0], aten.mul.Tensor):
        return None
    for c, freqs in _mul_operands(real.args[0]):
        if is_call(c, aten.view_as_complex.default):
            x = c.args[0]
            while is_call(x, *_RESHAPES):
                x = x.args[0]
            if x is c.args[0] or not _proves(x, c.args[0], _pairs_of):
                return None
            return RopeMatch(real, x, freqs, None, int(val(x).shape[-1]), True, "complex")
    return None


def _match_partial(node) -> RopeMatch | None:
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    rot, rest = node.args[0]
    inner = match_rope(rot, partial=False)
    if inner is None or not is_call(rest, aten.slice.Tensor) or not is_call(inner.x, aten.slice.Tensor):
        return None
    src = inner.x.args[0]
    if rest.args[0] is not src or inner.x.args[2] not in (0, None) or rest.args[2] != inner.rotary_dim:
        return None
    return RopeMatch(node, src, inner.cos, inner.sin, inner.rotary_dim, inner.interleaved, inner.kind + "+partial")


def match_rope(node, partial: bool = True) -> RopeMatch | None:
    """The RoPE application producing `node` (after layout ops), or None."""
    if not isinstance(node, fx.Node):
        return None
    node = layout_root(node)
    found = (_match_partial(node) if partial else None) or _match_pairs(node) or _match_complex(node)
    return found


def _strip_scale(node) -> tuple[fx.Node, float]:
    factor = 1.0
    while True:
        node = layout_root(node)
        if is_call(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)):
            factor *= float(node.args[1])
            node = node.args[0]
        elif is_call(node, aten.cat.default) and len({layout_root(a) for a in node.args[0]}) == 1:
            node = node.args[0][0]  # cat((freqs, freqs)) of rotate-half
        elif is_call(node, *CONVERTS):  # cos.to(q.dtype): the rotary module computes in float32
            node = node.args[0]
        else:
            return node, factor


def _integer_root(node):
    root = layout_root(node)
    while is_call(root, *CONVERTS):
        root = layout_root(root.args[0])
    if isinstance(val(root), torch.Tensor) and not val(root).is_floating_point():
        return root
    return None


def _constant_like(node) -> bool:
    root = layout_root(node)
    while is_call(root, *CONVERTS):
        root = layout_root(root.args[0])
    return isinstance(root, fx.Node) and root.op in ("placeholder", "get_attr")


def trace_angle(cos: fx.Node) -> Angle:
    """Classify where a cos (or freqs_cis) tensor comes from."""
    node, factor = _strip_scale(cos)
    if is_call(node, aten.cos.default, aten.polar.default):
        node, _ = _strip_scale(node.args[-1] if is_call(node, aten.polar.default) else node.args[0])
    if is_call(node, *_TABLE_OPS) or (is_call(node, aten.split.Tensor)):
        return Angle("table", factor=factor)
    operands = []
    if is_call(node, aten.mul.Tensor, aten.outer.default, aten.bmm.default, aten.mm.default, aten.matmul.default):
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) == 2:
        for pos, inv in (operands, operands[::-1]):
            pos_root = _integer_root(pos)
            if pos_root is not None:
                kind = "inv_freq" if _constant_like(inv) else "dynamic"
                return Angle(kind, positions=pos_root, inv_freq=layout_root(inv), factor=factor)
    if node.op in ("placeholder", "get_attr"):
        return Angle("table", factor=factor)
    return Angle("unknown", factor=factor)
