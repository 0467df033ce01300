"""Rewriter: proves the remaining conditions of a site (mask, causality, that the gathers vanish)
and replaces it by `gauge::rotated_query_attention`, one call per block pool, merged through the
log-sum-exp: out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i(lse_i).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .attention_detect import AttentionMatch
from .fx_utils import AnalysisError, Builder, aten, const_eval, static_shape, val
from .kv_detect import KVPlan

RQA = torch.ops.gauge.rotated_query_attention.default
_MASKED = -1e30  # additive mask values at or below this are exact zeros after softmax in any float dtype


def _visible(mask_val: torch.Tensor) -> torch.Tensor:
    if mask_val.dtype == torch.bool:
        return mask_val
    finite = mask_val[mask_val > _MASKED]
    if finite.numel() and bool((finite != 0).any()):
        raise AnalysisError("the additive mask has values other than 0 and -inf (a bias or soft mask)")
    return mask_val > _MASKED


def causal_mode(site: AttentionMatch, q_len: int, kv_len: int, owner) -> str:
    """'none' or 'causal' (bottom-right), or AnalysisError naming what the mask does instead."""
    if site.is_causal and site.masks:
        raise AnalysisError("both is_causal and an explicit mask")
    if site.is_causal:
        if q_len != kv_len and q_len != 0:
            raise AnalysisError(f"is_causal with q_len {q_len} != kv_len {kv_len} is top-left aligned")
        return "causal" if q_len > 1 else "none"
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    for mask in site.masks:
        visible = visible & _visible(const_eval(mask, owner))
    flat = visible.reshape(-1, q_len, kv_len)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    if bool(flat.all()):
        return "none"
    if bool((flat == causal).all()):
        return "causal"
    raise AnalysisError("the mask is neither all-visible nor the bottom-right causal mask (padding or window)")


def is_impure(node: fx.Node) -> bool:
    """Impure = must stay even when unused; attention's dropout seed does not count (dropout_p is 0 here)."""
    return node.is_impure(impure_random=False)


def dead_after(graph: fx.Graph, replaced: fx.Node) -> set[fx.Node]:
    """Nodes that become unused once `replaced` has no users."""
    dead = {replaced}
    for node in reversed(graph.nodes):
        if node.op == "call_function" and all(u in dead for u in node.users) and not is_impure(node):
            dead.add(node)
    return dead


def check_rewrite(graph: fx.Graph, site: AttentionMatch, plan: KVPlan, owner) -> list[bool]:
    """Per-piece causal flags, or AnalysisError with the failed condition."""
    if site.problems:
        raise AnalysisError("; ".join(site.problems))
    q_len = static_shape(site.q)[2]
    lengths = [p.length for p in plan.pieces]
    total = sum(lengths)
    mode = causal_mode(site, q_len, total, owner)
    flags, start = [], 0
    for length in lengths:
        end = start + length
        if mode == "none" or end <= total - q_len:
            flags.append(False)
        elif start <= total - q_len and end == total and length >= q_len:
            flags.append(True)
        else:
            raise AnalysisError("the causal diagonal crosses a piece boundary that is not the last piece")
        start = end
    dead = dead_after(graph, site.out)
    alive = [n.name for n in plan.gather_nodes if n not in dead]
    if alive:
        raise AnalysisError(f"the gathered/concatenated cache ({', '.join(alive)}) is also used elsewhere "
                            "(e.g. returned as the new cache), so rewriting would not remove it")
    return flags


def rewrite(graph: fx.Graph, site: AttentionMatch, plan: KVPlan, flags: list[bool]) -> fx.Node:
    """Insert the rotated-query attention(s) before the site and redirect the site's users to them."""
    b = Builder(graph, site.anchor)
    q = site.q
    bsz = static_shape(q)[0]
    dev = val(q).device
    i64 = dict(dtype=torch.int64, device=dev)
    outs = []
    for piece, causal in zip(plan.pieces, flags, strict=True):
        if piece.materialize is not None:
            kp, vp, table, delta, inv_freq, rot, inter, length = piece.materialize.args
            seq = b(aten.full.default, [bsz], length, **i64)
            args = (kp, vp, table, delta, seq, inv_freq, rot, inter)
        else:
            kp = b(aten.permute.default, piece.k, [0, 2, 1, 3])
            vp = b(aten.permute.default, piece.v, [0, 2, 1, 3])
            rows = piece.table
            if rows is None:
                rows = b(torch.ops.prims.iota.default, bsz, start=0, step=1, requires_grad=False, **i64)
            table = b(aten.reshape.default, rows, [bsz, 1])
            if piece.shift is None:
                delta = b(aten.full.default, [bsz, 1], 0, **i64)
                inv_freq = b(aten.full.default, [1], 0.0, dtype=torch.float64, device=dev)
            else:
                shift = b(aten.reshape.default, piece.shift, [-1, 1])
                delta = b(aten.expand.default, b(torch.ops.prims.convert_element_type.default, shift, torch.int64),
                          [bsz, 1])
                inv_freq = b(torch.ops.prims.convert_element_type.default,
                             b(aten.reshape.default, piece.inv_freq, [-1]), torch.float64)
                if val(inv_freq).shape[0] * 2 != piece.rotary_dim:
                    raise AnalysisError("the re-rotation's inv_freq does not match its rotary width")
            seq = b(aten.full.default, [bsz], piece.length, **i64)
            args = (kp, vp, table, delta, seq, inv_freq, piece.rotary_dim, piece.interleaved)
        call = b(RQA, q, *args, site.scale, causal)
        outs.append((b(operator.getitem, call, 0), b(operator.getitem, call, 1)))
    if len(outs) == 1:
        new_out = outs[0][0]
    else:
        # elementwise log-sum-exp (post-grad graphs have no lowering for stack/logsumexp)
        top = outs[0][1]
        for _, lse_i in outs[1:]:
            top = b(aten.maximum.default, top, lse_i)
        weights = [b(aten.exp.default, b(aten.sub.Tensor, lse_i, top)) for _, lse_i in outs]
        total = weights[0]
        for w in weights[1:]:
            total = b(aten.add.Tensor, total, w)
        acc = None
        for (out, _), w in zip(outs, weights, strict=True):
            term = b(aten.mul.Tensor, out, b(aten.unsqueeze.default, b(aten.div.Tensor, w, total), -1))
            acc = term if acc is None else b(aten.add.Tensor, acc, term)
        new_out = b(torch.ops.prims.convert_element_type.default, acc, val(q).dtype)
    site.out.replace_all_uses_with(new_out)
    return new_out
