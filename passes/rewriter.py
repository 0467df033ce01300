"""Rewriter: proves the remaining conditions of a site (mask, causality, that the gathers vanish)
and replaces it by `gauge::rotated_query_attention`, one call per block pool, merged through the
log-sum-exp: out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i(lse_i).
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._prims_common import is_contiguous_or_false

from gaugecompile.ops.masked_attention import MASKED as _MASKED

from .attention_detect import AttentionMatch
from .fx_utils import (
    AnalysisError,
    Builder,
    RuntimeValueError,
    as_int,
    aten,
    concrete,
    concrete_shape,
    const_eval,
    is_call,
    known_equal,
    layout_root,
    location,
    shape,
    size_envs,
    val,
)
from .kv_detect import KVPlan, Piece
from .rope_detect import match_rope

RQA = torch.ops.gauge.rotated_query_attention.default
RQA_MASKED = torch.ops.gauge.rotated_query_attention_masked.default
MATERIALIZE_SCHEMA = torch.ops.gauge.materialize_kv.default._schema
CHECK_ROPE = torch.ops.gauge.check_rope_basis.default


def _visible(mask_val: torch.Tensor) -> torch.Tensor:
    if mask_val.dtype == torch.bool:
        return mask_val
    finite = mask_val[mask_val > _MASKED]
    if finite.numel() and bool((finite != 0).any()):
        raise AnalysisError("the additive mask has values other than 0 and -inf (a bias or soft mask)")
    return mask_val > _MASKED


def _check_mask_shape(mask, scores: tuple[int, ...], form: str, env: dict) -> None:
    """The mask must be a tensor broadcasting to the scores [B, H, q_len, kv_len] without growing them (and, as
    `scaled_dot_product_attention` requires, have at least the two [q_len, kv_len] dims)."""
    if not isinstance(val(mask), torch.Tensor):
        raise AnalysisError(f"the attention mask is not a tensor ({type(val(mask)).__name__})")
    mask_shape = concrete_shape(mask, env)
    if form != "eager-chain" and len(mask_shape) < 2:
        raise AnalysisError(f"the attention mask has shape {list(mask_shape)}; sdpa expects [..., q_len, kv_len]")
    try:
        grown = tuple(torch.broadcast_shapes(mask_shape, scores)) != scores
    except RuntimeError:
        grown = True
    if grown:
        raise AnalysisError(f"the attention mask of shape {list(mask_shape)} does not broadcast to the scores "
                            f"{list(scores)}")


def causal_mode(site: AttentionMatch, q_len: int, kv_len: int, owner, env: dict | None = None) -> str:
    """'none' or 'causal' (bottom-right) at concrete sizes (`env` assigns the graph's size symbols),
    or AnalysisError naming what the mask does instead."""
    if site.is_causal and site.masks:
        raise AnalysisError("both is_causal and an explicit mask")
    if site.is_causal:
        if q_len != kv_len and q_len != 0:
            raise AnalysisError(f"is_causal with q_len {q_len} != kv_len {kv_len} is top-left aligned")
        return "causal" if q_len > 1 else "none"
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    scores = (*concrete(shape(site.q)[:-2], env or {}), q_len, kv_len)
    for mask in site.masks:
        _check_mask_shape(mask, scores, site.form, env or {})
        visible = visible & _visible(const_eval(mask, owner, env))
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


def dead_after(graph: fx.Graph, *replaced: fx.Node) -> set[fx.Node]:
    """Nodes that become unused once the `replaced` ones have no users."""
    dead = set(replaced)
    for node in reversed(graph.nodes):
        if node.op == "call_function" and all(u in dead for u in node.users) and not is_impure(node):
            dead.add(node)
    return dead


def _piece_flags(mode: str, q_len: int, lengths: list[int]) -> tuple[bool, ...]:
    """Which pieces need the (bottom-right) causal mask: only the last, holding the queries' own keys."""
    total = sum(lengths)
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
    return tuple(flags)


def _flags_at(site: AttentionMatch, plan: KVPlan, owner, env: dict) -> tuple[bool, ...] | None:
    """Per-piece causal flags with the mask evaluated under the size assignment `env`, or None when `env`
    is outside what the rewrite computes for."""
    q_len = concrete(shape(site.q)[2], env)
    lengths = [concrete(p.length, env) for p in plan.pieces]
    if q_len > sum(lengths) or (site.assume_square and q_len != sum(lengths)):
        return None  # more queries than keys (rows with no key, outside the op's contract), or excluded by the assert
    return _piece_flags(causal_mode(site, q_len, sum(lengths), owner, env), q_len, lengths)


def _proven_flags(graph: fx.Graph, site: AttentionMatch, plan: KVPlan, owner) -> tuple[bool, ...]:
    """The flags the mask gives at every size assignment of `size_envs`.

    Raises RuntimeValueError when the mask is right at the traced sizes but not provably so at all of them
    (it is a graph input, or built from sizes the graph does not tie together), AnalysisError otherwise.
    """
    envs = size_envs(graph)
    traced = _flags_at(site, plan, owner, envs[0])
    if traced is None:
        raise AnalysisError("more queries than keys at the traced sizes")
    for env in envs[1:]:
        try:
            flags = _flags_at(site, plan, owner, env)
        except RuntimeValueError:
            raise
        except AnalysisError as exc:
            raise RuntimeValueError(f"the mask is causal at the traced sizes but not at others ({exc})") from exc
        if flags is not None and flags != traced:
            raise RuntimeValueError("the mask's causal structure changes with the sequence length")
    return traced


def _checked_flags(graph: fx.Graph, site: AttentionMatch, plan: KVPlan) -> tuple[bool, ...]:
    """The flag of a single view whose single mask the masked op checks at run time to be the bottom-right
    causal one (causal unless there is one query row); the mask must broadcast to the scores at every size
    assignment."""
    if len(plan.pieces) != 1 or len(site.masks) != 1:
        raise AnalysisError(f"a mask known only at run time over {len(plan.pieces)} views with {len(site.masks)} "
                            "masks (the run-time check takes one view and one mask)")
    for env in size_envs(graph):
        q_len = concrete(shape(site.q)[2], env)
        scores = (*concrete(shape(site.q)[:-2], env), q_len, concrete(plan.pieces[0].length, env))
        _check_mask_shape(site.masks[0], scores, site.form, env)
    return (not known_equal(shape(site.q)[2], 1),)


def _windowed_flags(graph: fx.Graph, site: AttentionMatch, plan: KVPlan, run_time_masks: bool) -> list[bool]:
    """The flags of a view sliced from a token on, whose mask the masked op checks at run time against the causal
    masks with a sliding window (the slice itself says nothing of the window: it only drops keys).  One query and
    no mask (a model whose cache alone bounds the window, as Moshi's) sees every key of the slice: the op with a
    window of the slice's length."""
    if not site.masks and not site.is_causal and known_equal(shape(site.q)[2], 1):
        site.window_by_slice = True
        _check_gathers_vanish(graph, site, plan)
        return [False]
    if not run_time_masks:
        raise AnalysisError("a sliced materialize_kv view needs a run-time mask check (they are off here)")
    if site.is_causal or not site.masks:
        raise AnalysisError("a sliced materialize_kv view without an explicit mask (is_causal would be top-left "
                            "aligned on the slice)")
    flags = list(_checked_flags(graph, site, plan))
    site.check_mask = True
    _check_gathers_vanish(graph, site, plan)
    return flags


def _check_gathers_vanish(graph: fx.Graph, site: AttentionMatch, plan: KVPlan) -> None:
    """AnalysisError when a gather the rewrite removes is also used elsewhere (so it would stay).  The graph's other
    attention sites (in `site.peers`) count as removed: a view that several layers read (Gemma 3n's KV-sharing layers
    attend over another layer's view) goes once all of them are rewritten."""
    dead = dead_after(graph, site.out, *site.lse_users, *site.peers)
    alive = [n.name for n in plan.gather_nodes if n not in dead]
    if alive:
        raise AnalysisError(f"the gathered/concatenated cache ({', '.join(alive)}) is also used elsewhere "
                            "(e.g. returned as the new cache), so rewriting would not remove it")


def check_rewrite(
    graph: fx.Graph, site: AttentionMatch, plan: KVPlan, owner, run_time_masks: bool = True
) -> list[bool]:
    """Per-piece causal flags, or AnalysisError with the failed condition.

    With dynamic shapes the mask and causality are evaluated under every assignment of `size_envs`
    (the traced sizes and perturbed ones) and must give the same flags at all of them.  Over
    ManifoldCache's `materialize_kv` a mask that cannot be proven that way (built in another graph, or
    from sizes read on both sides of a graph break) is checked at run time instead, by
    `gauge::rotated_query_attention_masked`: rotated-query attention when it is the bottom-right causal
    mask (the one a view ending in the queries' own tokens has), masked attention over the view otherwise.
    A view sliced from a token on (a sliding-window layer's) always takes that check, which also reads the
    window from its mask.
    """
    if site.problems:
        raise AnalysisError("; ".join(site.problems))
    if not run_time_masks and any(p.tokens is not None for p in plan.pieces):
        raise AnalysisError("keys gathered by a token index need a run-time range check (run-time checks are off "
                            "here)")
    if site.tiled_heads and (site.sinks is not None or any(
            len(shape(m)) == 4 and not known_equal(shape(m)[1], 1) for m in site.masks)):
        raise AnalysisError("GQA by repeat with per-head masks or sinks (the rewrite regroups the query heads)")
    if any(not known_equal(val(p.first), 0) for p in plan.pieces):
        return _windowed_flags(graph, site, plan, run_time_masks)
    q_sym, kv_sym = shape(site.q)[2], sum(p.length for p in plan.pieces)
    over_views = all(p.materialize is not None for p in plan.pieces)
    # is_causal is top-left aligned: the op's bottom-right mask is the same only when q_len == kv_len.  When the
    # graph does not tie the two sizes (the decision was taken in another graph, as transformers does when a
    # cache's bookkeeping breaks the graph) but they are equal at the traced sizes, the rewrite asserts it at run
    # time: the rewritten graph either computes what the original did or raises.
    # Only over materialize_kv, whose view ends with the queries' own tokens (top-left with q_len < kv_len would
    # hide the cache from every query); elsewhere the site is refused.
    unequal = site.is_causal and not site.masks and not known_equal(q_sym, 1) and not known_equal(q_sym, kv_sym)
    if unequal and not over_views:
        raise AnalysisError(f"is_causal with q_len {q_sym} and kv_len {kv_sym} not provably equal is top-left aligned")
    site.assume_square = unequal
    try:
        flags = list(_proven_flags(graph, site, plan, owner))
    except RuntimeValueError as exc:
        if not over_views:
            raise
        if not run_time_masks:
            raise AnalysisError(f"{exc} (run-time mask checks are off here)") from exc
        flags = list(_checked_flags(graph, site, plan))
        site.check_mask = True
    _check_gathers_vanish(graph, site, plan)
    return flags


def _size(b: Builder, node: fx.Node, dim: int):
    """Dimension `dim` of `node` as an int, or a `sym_size` node when it is symbolic."""
    d = shape(node)[dim]
    return d if isinstance(d, int) else b(aten.sym_size.int, node, dim)


def _piece_length(b: Builder, piece: Piece):
    """The tokens a piece attends to, as an int or a size node read from what the rewrite keeps (the pool or the
    token index, not the gather it removes)."""
    if piece.materialize is not None:
        return piece.materialize.args[8]
    return _size(b, piece.tokens, 0) if piece.tokens is not None else _size(b, piece.k, piece.seq_dim)


def _kv_length(b: Builder, plan: KVPlan):
    """The keys' total length as an int or a size node."""
    total = None
    for piece in plan.pieces:
        length = _piece_length(b, piece)
        total = length if total is None else b(operator.add, total, length)
    return total


def _assert_square(b: Builder, graph: fx.Graph, site: AttentionMatch, plan: KVPlan) -> None:
    """Insert `assert q_len == kv_len` (the condition under which is_causal is the op's causal mask)."""
    same = b(operator.eq, _size(b, site.q, 2), _kv_length(b, plan))
    with graph.inserting_before(site.anchor):
        graph.call_function(aten._assert_scalar.default,
                            (same, "gauge: is_causal attention rewritten for q_len == kv_len, got unequal sizes"))


def rewrite(graph: fx.Graph, site: AttentionMatch, plan: KVPlan, flags: list[bool]) -> fx.Node:
    """Insert the rotated-query attention(s) before the site and redirect the site's users to them."""
    b = Builder(graph, site.anchor)
    q = site.q
    if not is_contiguous_or_false(val(q)):
        # the op returns a contiguous output and its fake kernel copies q's strides: give it a contiguous q
        q = b(aten.clone.default, q, memory_format=torch.contiguous_format)
    if site.assume_square:
        _assert_square(b, graph, site, plan)
    if site.tiled_heads:
        q = _regroup_heads(b, q, shape(site.k)[1], tiled=True)
    if site.check_mask:
        kp, vp, table, delta, lens, inv_freq, rot, inter, length = plan.pieces[0].materialize.args[:9]
        inv_freq = _checked_inv_freq(b, site, inv_freq)
        call = b(RQA_MASKED, q, kp, vp, table, delta, lens, inv_freq, rot, inter, length, site.scale,
                 site.masks[0], plan.pieces[0].first, site.softcap, site.sinks, *_scales(plan.pieces[0].materialize))
        new_out, lse = b(operator.getitem, call, 0), b(operator.getitem, call, 1)
        site.kernels.append((val(q), val(kp), rot, inter, flags[0]))
    else:
        new_out, lse = _piece_attention(b, q, site, plan, flags)
        if site.sinks is not None:
            new_out = _with_sinks(b, new_out, lse, site.sinks)
    if site.tiled_heads:
        new_out = _regroup_heads(b, new_out, shape(site.k)[1], tiled=False)
        lse = b(aten.squeeze.dim, _regroup_heads(b, b(aten.unsqueeze.default, lse, -1), shape(site.k)[1],
                                                 tiled=False), -1)
    for user in site.lse_users:  # the model's own logsumexp of the scores is the op's
        user.replace_all_uses_with(b(torch.ops.prims.convert_element_type.default, lse, val(user).dtype))
    new_out = _match_layout(b, new_out, site.out)
    site.out.replace_all_uses_with(new_out)
    return new_out


def _scales(materialize: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """The scales (k_scale, v_scale) a `materialize_kv` node reads its compressed pools with (None, None for float
    pools): the op reads the pools in place with the same scales."""
    schema = MATERIALIZE_SCHEMA.arguments
    found = []
    for name in ("k_scale", "v_scale"):
        index = next(i for i, a in enumerate(schema) if a.name == name)
        found.append(materialize.args[index] if len(materialize.args) > index else materialize.kwargs.get(name))
    return found[0], found[1]


def _regroup_heads(b: Builder, x: fx.Node, num_kv: int, tiled: bool) -> fx.Node:
    """Heads [B, H, Q, D] from the order of GQA by `repeat` (head r * num_kv + j reads KV head j) to the op's
    (head j * rep + r reads KV head j) with `tiled`, and back without: an index map, exact."""
    heads, head_dim = shape(x)[1], shape(x)[3]
    rep = heads // num_kv
    split = [rep, num_kv] if tiled else [num_kv, rep]
    parts = b(aten.reshape.default, x, [_size(b, x, 0), *split, _size(b, x, 2), head_dim])
    moved = b(aten.clone.default, b(aten.permute.default, parts, [0, 2, 1, 3, 4]),
              memory_format=torch.contiguous_format)
    return b(aten.reshape.default, moved, [_size(b, x, 0), heads, _size(b, x, 2), head_dim])


def _with_sinks(b: Builder, out: fx.Node, lse: fx.Node, sinks: fx.Node) -> fx.Node:
    """Attention with sink logits from attention without: a sink adds exp(sink) to the softmax denominator, so
    out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse - sink), row by row (sinks [B, H, Q, 1])."""
    sink = b(torch.ops.prims.convert_element_type.default, b(aten.select.int, sinks, -1, 0), val(lse).dtype)
    weight = b(aten.sigmoid.default, b(aten.sub.Tensor, lse, sink))
    weight = b(torch.ops.prims.convert_element_type.default, b(aten.unsqueeze.default, weight, -1), val(out).dtype)
    return b(aten.mul.Tensor, out, weight)


def _piece_attention(b: Builder, q: fx.Node, site: AttentionMatch, plan: KVPlan,
                     flags: list[bool]) -> tuple[fx.Node, fx.Node]:
    """One rotated-query attention per piece of the plan, merged through the log-sum-exp: (out, lse)."""
    bsz = _size(b, q, 0)
    outs = []
    for piece, causal in zip(plan.pieces, flags, strict=True):
        if piece.materialize is not None:
            args = list(piece.materialize.args[:8])  # pools, table, deltas, counts, rope: read in place
            args[5] = _checked_inv_freq(b, site, args[5])
        else:
            args = _pool_args(b, piece, bsz)
        window = 0
        if site.window_by_slice:  # the last length - first tokens of the view
            window = b(operator.sub, piece.materialize.args[8], piece.first)
        scales = _scales(piece.materialize) if piece.materialize is not None else (None, None)
        call = b(RQA, q, *args, site.scale, causal, window, site.softcap, *scales)
        site.kernels.append((val(q), val(args[0]), args[6], args[7], causal))
        outs.append((b(operator.getitem, call, 0), b(operator.getitem, call, 1)))
    if len(outs) == 1:
        new_out, lse = outs[0]
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
        lse = b(aten.add.Tensor, top, b(aten.log.default, total))
    return new_out, lse


def _pool_args(b: Builder, piece: Piece, bsz) -> tuple:
    """The op's (pools, table, deltas, counts, rope) for a piece that is not a `materialize_kv` view: its cache seen
    in place as one block per row ([B', len, Hkv, D]: table = the row, delta = the row's re-rotation), or, over a
    token index, as blocks of one token ([B' * len, 1, Hkv, D]: table = row * len + token, delta = the token's)."""
    dev = val(piece.k).device
    i64 = dict(dtype=torch.int64, device=dev)
    kp, vp = piece.k, piece.v
    if piece.seq_dim == 2:
        kp, vp = b(aten.permute.default, kp, [0, 2, 1, 3]), b(aten.permute.default, vp, [0, 2, 1, 3])
    rows = piece.table
    if rows is None:
        rows = b(torch.ops.prims.iota.default, bsz, start=0, step=1, requires_grad=False, **i64)
    rows = b(aten.reshape.default, rows, [bsz, 1])
    width = 1
    if piece.tokens is None:
        table, lens = rows, b(aten.full.default, [bsz, 1], _piece_length(b, piece), **i64)
    else:
        kp, vp, table = _token_blocks(b, kp, vp, rows, piece.tokens)
        width = _piece_length(b, piece)
        lens = b(aten.full.default, [bsz, width], 1, **i64)
    if piece.delta is None:
        delta = b(aten.full.default, [bsz, width], 0, **i64)
        inv_freq = b(aten.full.default, [1], 0.0, dtype=torch.float64, device=dev)
    else:
        delta = b(aten.reshape.default, piece.delta, [1, -1] if piece.per_token else [-1, 1])
        delta = b(aten.expand.default, b(torch.ops.prims.convert_element_type.default, delta, torch.int64),
                  [bsz, width])
        inv_freq = b(torch.ops.prims.convert_element_type.default,
                     b(aten.reshape.default, piece.inv_freq, [-1]), torch.float64)
        if val(inv_freq).shape[0] * 2 != piece.rotary_dim:
            raise AnalysisError("the re-rotation's inv_freq does not match its rotary width")
    return kp, vp, table, delta, lens, inv_freq, piece.rotary_dim, piece.interleaved


def _token_blocks(b: Builder, kp: fx.Node, vp: fx.Node, rows: fx.Node, tokens: fx.Node) -> tuple:
    """Pools [B', len, Hkv, D] as blocks of one token [B' * len, 1, Hkv, D] (a view: the detector checked that the
    batch and sequence dims merge) and the table rows * len + tokens, after a run-time check that every token index
    is in [0, len) (index_select raises there; past a row's end the table would read the next row)."""
    length = _size(b, kp, 1)
    flat = [b(operator.mul, _size(b, kp, 0), length), 1, _size(b, kp, 2), _size(b, kp, 3)]
    idx = b(torch.ops.prims.convert_element_type.default, b(aten.reshape.default, tokens, [1, -1]), torch.int64)
    outside = b(aten.logical_or.default, b(aten.lt.Scalar, idx, 0), b(aten.ge.Scalar, idx, length))
    gathers = [u for u in tokens.users if is_call(u, aten.index_select.default, aten.index.Tensor)]
    where = location(gathers[0]) if gathers else tokens.name
    b(aten._assert_async.msg, b(aten.logical_not.default, b(aten.any.default, outside)),
      f"gauge: the token index of the cache gather at {where} is out of range [0, {shape(kp)[1]})")
    table = b(aten.add.Tensor, b(aten.mul.Tensor, rows, length), idx)
    return b(aten.view.default, kp, flat), b(aten.view.default, vp, flat), table


def _checked_inv_freq(b: Builder, site: AttentionMatch, cache_inv_freq: fx.Node) -> fx.Node:
    """The cache's inv_freq for a rewritten attention over its `materialize_kv`, checked at run time against the
    inv_freq the site's queries are rotated with (`gauge::check_rope_basis`, once per graph and pair) where the
    graph reads that from a tensor; as it is where the queries' angles come from elsewhere (a table)."""
    match = match_rope(layout_root(site.q)) or match_rope(site.q)
    angle = match.angle() if match is not None else None
    if angle is None or angle.kind != "inv_freq" or not isinstance(val(angle.inv_freq), torch.Tensor):
        return cache_inv_freq
    got, want = val(angle.inv_freq).numel(), val(cache_inv_freq).numel()
    if got != want:
        raise AnalysisError(f"the queries are rotated at {got} frequencies, the cache's keys at {want} (its config's "
                            "rotary dim differs from the model's)")
    for node in b.graph.nodes:  # an earlier site's check of the same pair serves this one too
        if node is site.anchor:
            break
        if node.target is CHECK_ROPE and node.args == (angle.inv_freq, cache_inv_freq):
            return node
    return b(CHECK_ROPE, angle.inv_freq, cache_inv_freq)


def _match_layout(b: Builder, new: fx.Node, old: fx.Node) -> fx.Node:
    """Lay `new` (contiguous) out in `old`'s dimension order: later `view`s (flash attention returns
    [B, Q, H, D] memory seen as [B, H, Q, D]) rely on it."""
    old_val = val(old)
    if is_contiguous_or_false(old_val):
        return new
    strides = [as_int(st) for st in old_val.stride()]
    if not all(isinstance(st, int) for st in strides):
        strides = [concrete(st, size_envs(b.graph)[0]) for st in old_val.stride()]
    order = sorted(range(len(strides)), key=lambda d: (-strides[d], d))
    if order == list(range(len(strides))):
        return new
    physical = b(aten.clone.default, b(aten.permute.default, new, order), memory_format=torch.contiguous_format)
    return b(aten.permute.default, physical, [order.index(d) for d in range(len(order))])
