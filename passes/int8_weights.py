"""Weight-only int8 matmuls over bfloat16 activations as ATen's fused CPU kernel, `aten._weight_int8pack_mm`.

torchao's `Int8WeightOnlyConfig` computes a linear as `mm(x, int8_weight.t().to(bfloat16)) * scale`, and the
post-grad graph holds exactly that chain: `mul(mm(x, convert(permute(w, [1, 0]), bfloat16)), scale)`.  Inductor
compiles it into a conversion of the whole weight to bfloat16 followed by a GEMM; ATen's
`_weight_int8pack_mm(x, w, scale)` reads the int8 weight once and accumulates in float32 (measured on a 2-core
AVX2 EPYC, a 1536 x 576 weight and one token: 43 us against 165 us for the compiled chain).  It is the same
product, rounded once where the chain rounds twice (the mm's bfloat16 output, then its product with the scale).

Only bfloat16 activations on the CPU are rewritten: there the fused kernel is the faster one.  For float32 and
float16 activations it is slower than the chain on the same machine (687 / 755 us), so those stay as they are.
"""

from __future__ import annotations

import torch
from torch import fx

from .fx_utils import Builder, is_call, val

__all__ = ["fuse_int8_weight_matmuls"]

aten, prims = torch.ops.aten, torch.ops.prims


def _int8_weight(mm: fx.Node) -> fx.Node | None:
    """The [N, K] int8 CPU weight `w` of `mm(x, convert(permute(w, [1, 0]), bfloat16))` over bfloat16 `x`, used
    by nothing else; None where `mm` is not that."""
    x, wt = mm.args
    if not (is_call(wt, prims.convert_element_type.default) and wt.args[1] == torch.bfloat16
            and len(wt.users) == 1 and is_call(wt.args[0], aten.permute.default)
            and list(wt.args[0].args[1]) == [1, 0] and len(wt.args[0].users) == 1):
        return None
    w, xv = wt.args[0].args[0], val(x)
    wv = val(w)
    if not (isinstance(wv, torch.Tensor) and wv.dtype == torch.int8 and wv.dim() == 2 and wv.device.type == "cpu"
            and isinstance(xv, torch.Tensor) and xv.dtype == torch.bfloat16 and xv.dim() == 2):
        return None
    return w


def fuse_int8_weight_matmuls(graph: fx.Graph) -> int:
    """Rewrite each `mul(mm(x, convert(permute(w_int8, [1, 0]), bfloat16)), scale[N])` of `graph` into
    `_weight_int8pack_mm(x, w_int8, scale)`; returns how many."""
    fused = 0
    for mul in list(graph.nodes):
        if not is_call(mul, aten.mul.Tensor) or not isinstance(mul.args[0], fx.Node):
            continue
        mm, scale = mul.args
        if not is_call(mm, aten.mm.default) or len(mm.users) != 1 or not isinstance(scale, fx.Node):
            continue
        w = _int8_weight(mm)
        sv = val(scale)
        if w is None or not (isinstance(sv, torch.Tensor) and sv.dtype == torch.bfloat16
                             and tuple(sv.shape) == (val(w).shape[0],)):
            continue
        wt = mm.args[1]
        new = Builder(graph, mul)(aten._weight_int8pack_mm.default, mm.args[0], w, scale)
        mul.replace_all_uses_with(new)
        for dead in (mul, mm, wt, wt.args[0]):
            graph.erase_node(dead)
        fused += 1
    return fused
