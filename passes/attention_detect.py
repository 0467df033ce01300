"""Attention detector: scaled_dot_product_attention in every ATen form, and the explicit
matmul-scale-mask-softmax-matmul chain of eager attention (with Gemma 2's logit soft-capping
`c * tanh(s / c)` between the scale and the mask, and GPT-OSS's sink logits: a column concatenated to
the scores, softmax, the column dropped), with repeat-kv (expand/reshape, or JetMoE's `repeat`, which
tiles the KV heads: query head h then reads KV head h % num_kv_heads) for GQA.

Every layout step between a site and its q/k/v is proven by `probe_chain`, so a match means: the
site computes softmax(scale * q k^T + masks) v with k/v the head-repeated `k`/`v` found here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from .fx_utils import (
    LAYOUT_OPS,
    AnalysisError,
    as_int,
    aten,
    getitem_of,
    is_call,
    known_equal,
    probe_chain,
    shape,
    static_dim,
    val,
)

#: sdpa overload -> name shown in reports; every one returns the attention output first.
SDPA_FORMS = {
    aten.scaled_dot_product_attention.default: "sdpa",
    aten._scaled_dot_product_flash_attention_for_cpu.default: "sdpa-flash-cpu",
    aten._scaled_dot_product_flash_attention.default: "sdpa-flash",
    aten._scaled_dot_product_efficient_attention.default: "sdpa-efficient",
    aten._scaled_dot_product_cudnn_attention.default: "sdpa-cudnn",
}
# `_safe_softmax` (SDPA's math decomposition) differs only on rows whose every score is -inf, where it gives 0, not
# NaN; a rewritten site's masks are checked to show every query at least itself, so it has no such row.
_SOFTMAX = (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)
_MATMUL = (aten.bmm.default, aten.matmul.default)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
             torch.ops.prims.convert_element_type.default, aten._to_copy.default)


@dataclass
class AttentionMatch:
    """q [B,H,Q,D], k/v [B,Hkv,L,D] (before the head repeat), what the site adds to the scores."""

    anchor: fx.Node  # the replacement is inserted before this node
    out: fx.Node  # node whose uses get the replacement's output, shape [B,H,Q,D]
    form: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    is_causal: bool = False
    masks: list[fx.Node] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # conditions already known to fail
    assume_square: bool = False  # set by the rewriter: rewritten under a run-time check q_len == kv_len
    check_mask: bool = False  # set by the rewriter: rewritten under a run-time check that the masks are causal
    window_by_slice: bool = False  # set by the rewriter: one query over a sliced view, all of it visible
    kernels: list[tuple] = field(default_factory=list)  # set by the rewriter: (q, k_pool, rotary_dim, interleaved,
    #                                                      causal) of each op call, q/k_pool as fake tensors
    softcap: float = 0.0  # c of c * tanh(scale * q k^T / c), applied before the masks; 0: none
    sinks: fx.Node | None = None  # per-row sink logits [B, H, Q, 1]: an extra term in the softmax denominator
    tiled_heads: bool = False  # GQA by `repeat`: query head h reads KV head h % num_kv_heads (not h // group)
    lse_users: list[fx.Node] = field(default_factory=list)  # logsumexp(scores + masks, -1): the op's lse
    peers: list[fx.Node] = field(default_factory=list)  # set by the pipeline: every site's outputs in the graph


_REPEAT = frozenset({aten.repeat.default})
_SCALE = frozenset({aten.mul.Scalar, aten.mul.Tensor})


def _constant_factor(node: fx.Node) -> float | None:
    """c of `x * c` with c a nonzero constant (SDPA's math decomposition scales q and k by sqrt(scale) each)."""
    if not is_call(node, *_SCALE):
        return None
    c = node.args[1]
    return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0 else None


def _resolve(arg: fx.Node, heads: int,
             final: Callable[[torch.Tensor], torch.Tensor]) -> tuple[fx.Node, bool, float]:
    """The deepest 4-D node behind `arg` whose head-repeat (to `heads`) laid out by `final`, times a constant
    factor, is `arg`; whether the repeat tiles the heads (`repeat`: 0, 1, .., 0, 1, ..) rather than interleaving
    them (0, 0, .., 1, 1, ..); and the factor (the product of the constant multiplications on the way)."""
    path, factors = [arg], [1.0]
    while is_call(path[-1], *LAYOUT_OPS, *_REPEAT) or _constant_factor(path[-1]) is not None:
        factors.append(factors[-1] * (_constant_factor(path[-1]) or 1.0))
        path.append(path[-1].args[0])
    for cand, factor in reversed(list(zip(path, factors, strict=True))):
        v = val(cand)
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            continue
        cand_heads = as_int(v.shape[1])
        if not isinstance(cand_heads, int) or heads % cand_heads:
            continue
        rep = heads // cand_heads
        for tiled in (False, True) if rep > 1 else (False,):
            try:
                probe_chain(cand, arg, lambda t, dims, rep=rep, tiled=tiled, f=factor: final(
                    t.repeat(1, rep, 1, 1) if tiled else t.repeat_interleave(rep, dim=1)).mul(f).reshape(dims(arg)),
                    extra_ops=_REPEAT | _SCALE)
                return cand, tiled, factor
            except (AnalysisError, RuntimeError):
                continue
    raise AnalysisError(f"{arg.name} is not a head-repeated view of a [batch, kv_heads, len, head_dim] tensor")


def _resolve_own_heads(arg: fx.Node) -> tuple[fx.Node, bool, float]:
    """sdpa's k/v: behind a repeat-kv when its head count is static; a symbolic one is taken as is
    (sdpa's own `enable_gqa` grouping is the op's)."""
    heads = as_int(shape(arg)[1])
    return _resolve(arg, heads, lambda t: t) if isinstance(heads, int) else (arg, False, 1.0)


def _match_sdpa(node: fx.Node) -> AttentionMatch:
    _, kw = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    q, k, v = kw["query"], kw["key"], kw["value"]
    problems = []
    if kw.get("dropout_p", 0.0):
        problems.append(f"dropout_p={kw['dropout_p']}")
    if node.target is aten.scaled_dot_product_attention.default:
        out = node
    else:
        out = getitem_of(node, 0)
        extra = [u for u in node.users if u is not out]
        if extra:
            problems.append("the attention's log-sum-exp/extra outputs are used (training graph)")
    mask = kw.get("attn_mask", kw.get("attn_bias"))
    scale = kw.get("scale")
    scale = 1.0 / float(static_dim(q, -1)) ** 0.5 if scale is None else float(scale)
    (k_base, k_tiled, k_factor), (v_base, v_tiled, v_factor) = _resolve_own_heads(k), _resolve_own_heads(v)
    if k_tiled != v_tiled:
        raise AnalysisError("keys and values are repeated to the query heads in different orders")
    if v_factor != 1.0:
        raise AnalysisError(f"the values are scaled by {v_factor} (the output would be; not the op's form)")
    scale *= k_factor
    return AttentionMatch(out, out, SDPA_FORMS[node.target], q, k_base, v_base, scale,
                          bool(kw.get("is_causal", False)), [mask] if mask is not None else [], problems,
                          tiled_heads=k_tiled)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _forward_chain(softmax: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """(p, mm2, other users): softmax -> layout ops -> matmul(p, v), and the users off that path (None if no
    single such path)."""
    p, others = softmax, []
    while True:
        path = [u for u in p.users if is_call(u, *LAYOUT_OPS) or (is_call(u, *_MATMUL) and u.args[0] is p)]
        if len(path) != 1:
            return None
        others += [u for u in p.users if u is not path[0]]
        if is_call(path[0], *_MATMUL):
            return p, path[0], others
        p = path[0]


def _scores_operand(add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(scores, mask) of `scores + mask` in either order: the scores side is the one a matmul feeds."""
    a, b = add.args[:2]
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    for scores, mask in ((a, b), (b, a)):
        s = scores
        while is_call(s, *_RESHAPES, aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.tanh.default):
            s = s.args[0]
        if is_call(s, *_MATMUL) or _zero_based_baddbmm(s) is not None:
            return scores, mask
    return None


def _zero_based_baddbmm(node: fx.Node) -> float | None:
    """alpha of `baddbmm(zeros, a, b, beta, alpha)`, which is alpha * (a @ b) (GPT-NeoX-Japanese's scores), else
    None."""
    if not is_call(node, aten.baddbmm.default) or not is_call(node.args[0], aten.zeros.default):
        return None
    _, kw = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    alpha = kw.get("alpha", 1)
    return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None


def _last_dim(dims, node: fx.Node) -> bool:
    return list(dims) in ([-1], [len(shape(node)) - 1])


def _softmax_input(node: fx.Node) -> fx.Node | None:
    """x when `node` is a softmax of x over the last dim: `_softmax(x, -1)` or its decomposition
    `exp(x - amax(x)) / sum(exp(x - amax(x)))` (Inductor's post-grad graphs), else None."""
    if is_call(node, *_SOFTMAX):
        return node.args[0] if _last_dim([node.args[1]], node) else None
    if not (is_call(node, aten.div.Tensor) and is_call(node.args[1], aten.sum.dim_IntList)):
        return None
    e, total = node.args[0], node.args[1]
    if total.args[0] is not e or not _last_dim(total.args[1], e) or not is_call(e, aten.exp.default):
        return None
    centred = e.args[0]
    if is_call(centred, aten.where.self):
        return _scaled_softmax_input(centred)
    return _centred_input(centred)


def _centred_input(node) -> fx.Node | None:
    """x of `x - amax(x, -1)`."""
    if not is_call(node, aten.sub.Tensor) or not is_call(node.args[1], aten.amax.default):
        return None
    x, top = node.args[0], node.args[1]
    return x if top.args[0] is x and _last_dim(top.args[1], x) else None


def _scaled_softmax_input(where: fx.Node) -> fx.Node | None:
    """y = x * s of Inductor's scaled softmax: `where(finite, (x*1 - amax(x*1)) * s, y - amax(y))`, both
    branches being y - amax(y) for s > 0 (the first only reassociated)."""
    _, scaled, plain = where.args
    y = _centred_input(plain)
    if y is None or not is_call(y, aten.mul.Tensor) or not is_call(scaled, aten.mul.Tensor):
        return None
    x, s = y.args
    x1 = _centred_input(scaled.args[0])
    if not (isinstance(s, (int, float)) and s > 0 and scaled.args[1] == s and is_call(x1, aten.mul.Tensor)
            and x1.args == (x, 1)):
        return None
    return y


def _soft_cap(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(s, c) when `node` is `tanh(s / c) * c` (the division possibly as a product by 1 / c), c > 0 a constant."""
    if not (is_call(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)) and node.args[1] > 0
            and is_call(node.args[0], aten.tanh.default)):
        return None
    c, inner = float(node.args[1]), node.args[0].args[0]
    if is_call(inner, aten.div.Tensor) and inner.args[1] == c:
        return inner.args[0], c
    if is_call(inner, aten.mul.Tensor) and isinstance(inner.args[1], (int, float)) and \
            abs(inner.args[1] * c - 1.0) < 1e-12:
        return inner.args[0], c
    return None


def _row_centred(node: fx.Node) -> fx.Node:
    """c of `c - max(c, -1, keepdim=True)` (softmax does not see a per-row shift), else `node` itself."""
    if not is_call(node, aten.sub.Tensor) or not isinstance(node.args[1], fx.Node):
        return node
    c, top = node.args
    if is_call(top, aten.amax.default) and top.args[0] is c and _last_dim(top.args[1], c):
        return c
    if top.target is operator.getitem and top.args[1] == 0 and is_call(top.args[0], aten.max.dim) and \
            top.args[0].args[0] is c and _last_dim([top.args[0].args[1]], c):
        return c
    return node


def _sink_column(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(scores, sinks) when `node` is `cat([scores, sinks], -1)` with one sink logit per row."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    scores, sinks = node.args[0]
    if not _last_dim([dim], node) or not isinstance(sinks, fx.Node) or not known_equal(shape(sinks)[-1], 1):
        return None
    return scores, sinks


def _match_eager(softmax: fx.Node, x: fx.Node) -> AttentionMatch | None:
    """softmax(scale * (q @ k^T) + mask) @ v, or None if `softmax` (of `x`) is not inside such a chain."""
    # forward: softmax -> layout -> matmul(p, v) -> layout -> out [B, H, Q, D]
    chain = _forward_chain(softmax)
    if chain is None:
        return None
    p, mm2, others = chain
    out = mm2
    while val(out).dim() != 4 and (nxt := _single_user(out)) is not None and is_call(nxt, *LAYOUT_OPS):
        out = nxt
    if val(out).dim() != 4:
        return None
    heads = as_int(shape(out)[1])
    if not isinstance(heads, int):
        raise AnalysisError(f"the eager attention's head count is dynamic ({heads}); the repeat-kv proof needs it "
                            "static (compile with dynamic=False, or mark only sequence dims dynamic)")
    # backward: scores <- [sink column, mask adds, soft-cap, scale mul/div, layout] <- matmul(q, k^T)
    scale, softcap, masks, problems = 1.0, 0.0, [], []
    s, sinks = x, None
    if (split := _sink_column(_row_centred(x))) is not None:
        s, sinks = split
    while True:
        if is_call(s, *_RESHAPES):
            s = s.args[0]
        elif not softcap and (capped := _soft_cap(s)) is not None:
            if scale != 1.0:  # a factor after the cap scales the capped scores: not the op's form
                return None
            s, softcap = capped
        elif is_call(s, aten.mul.Tensor, aten.div.Tensor) and isinstance(s.args[1], (int, float)):
            scale = scale * s.args[1] if s.target is aten.mul.Tensor else scale / s.args[1]
            s = s.args[0]
        elif is_call(s, aten.add.Tensor) and (split := _scores_operand(s)) is not None:
            if softcap:  # a mask inside the cap's tanh
                return None
            s, mask = split
            masks.append(mask)
        else:
            break
    if (alpha := _zero_based_baddbmm(s)) is not None:
        mm1, (a1, k1), scale = s, s.args[1:3], scale * alpha
    elif is_call(s, *_MATMUL):
        mm1, (a1, k1) = s, s.args[:2]
    else:
        return None
    kv_len = shape(mm1)[-1]
    v2 = mm2.args[1]
    dropped = slice(0, -1) if sinks is not None else slice(None)  # the sink column is not a key
    try:
        probe_chain(softmax, mm2.args[0], lambda t, dims: t[..., dropped].reshape(dims(mm2.args[0])))
        probe_chain(mm2, out, lambda t, dims: t.reshape(dims(out)))
        q, _, q_factor = _resolve(a1, heads, lambda t: t)
        k, k_tiled, k_factor = _resolve(k1, heads, lambda t: t.transpose(-2, -1))
        v, v_tiled, v_factor = _resolve(v2, heads, lambda t: t)
    except AnalysisError:
        return None
    if k_tiled != v_tiled or v_factor != 1.0:
        return None
    scale *= q_factor * k_factor  # (SDPA's math decomposition scales both by sqrt(scale))
    if not known_equal(shape(q), shape(out)) or not known_equal(shape(k)[2], kv_len):
        return None
    if others:
        problems.append("the attention probabilities are used elsewhere (" + ", ".join(u.name for u in others) + ")")
    # Granite reads logsumexp(scores + masks) beside the softmax, for its post-attention sink scaling
    lse_users = [u for u in x.users if sinks is None and is_call(u, aten.logsumexp.default) and u.args[0] is x
                 and _last_dim(u.args[1], x) and not (len(u.args) > 2 and u.args[2])]
    # the replacement must be in place before the first of the nodes it replaces
    anchor = next(n for n in out.graph.nodes if n is out or n in lse_users)
    return AttentionMatch(anchor, out, "eager-chain", q, k, v, float(scale), False, masks, problems, softcap=softcap,
                          sinks=sinks, tiled_heads=k_tiled, lse_users=lse_users)


def find_attention(graph: fx.Graph) -> list[AttentionMatch | tuple[fx.Node, str]]:
    """All attention sites; a site whose structure could not be read is returned as (node, reason)."""
    found: list = []
    for node in list(graph.nodes):
        try:
            if is_call(node, *SDPA_FORMS):
                found.append(_match_sdpa(node))
            elif (x := _softmax_input(node)) is not None:
                m = _match_eager(node, x)
                if m is not None:
                    found.append(m)
        except AnalysisError as exc:
            found.append((node, str(exc)))
        except (RuntimeError, IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
            found.append((node, f"the attention's structure could not be analysed ({type(exc).__name__}: {exc})"))
    return found
