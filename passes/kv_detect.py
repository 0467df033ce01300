"""KV-gather detector: how an attention's keys/values were assembled from a cache.

Recognised (keys and values must be assembled the same way):
- `gauge::materialize_kv` (ManifoldCache's gather + re-rotation of a block pool), whole or from a token
  `first` on (a sliding-window layer's view: the keys before its window cut off);
- `cat` of pieces along the sequence (a past cache and new tokens; sink + window + new);
- per piece: `index_select`/advanced indexing on the batch dim by a table (beam reorder) and on the
  sequence dim by a token index (the tokens a StreamingLLM window keeps), a slice along the sequence,
  and RoPE re-applied to cached keys with one delta per row or, over a token index, one per token
  (StreamingLLM-style position shifting, also in the complex form of the original Llama code), on
  top of any tensor: a cache input, a static buffer written with `index_copy`/`index_put`/
  `slice_scatter`, or fresh keys;
- keys laid out `[batch, len, kv_heads, dim]` and transposed for the attention (the original Llama
  code), as well as `[batch, kv_heads, len, dim]`.

Every piece becomes a block pool with no copy: the cache seen as `[num_blocks=batch, block_size=len,
kv_heads, dim]`, block table = the row index, delta = the re-rotation (in positions); over a token index, blocks
of one token (`[batch * len, 1, kv_heads, dim]`), block table = row * len + token, delta = that token's.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .fx_utils import (
    CONVERTS,
    AnalysisError,
    aten,
    concrete,
    concrete_shape,
    const_eval,
    is_call,
    known_equal,
    layout_root,
    probe_chain,
    real_mode,
    shape,
    size_envs,
    val,
)
from .rope_detect import RopeMatch, match_rope

MATERIALIZE = torch.ops.gauge.materialize_kv.default
_CACHE_WRITES = (aten.index_copy.default, aten.index_put.default, aten.slice_scatter.default,
                 aten.select_scatter.default, aten.copy.default, aten.scatter.src)


@dataclass
class Piece:
    """One block pool: keys/values [B', Hkv, L, D] (or [B', L, Hkv, D] with `seq_dim` 1) as FX nodes, optional
    row table, token index and delta (the re-rotation, in positions)."""

    k: fx.Node
    v: fx.Node
    length: int | torch.SymInt  # the tokens the attention sees
    table: fx.Node | None = None
    delta: fx.Node | None = None  # integer positions: one per row (or one for all), or one per token of `tokens`
    tokens: fx.Node | None = None  # the token index along the sequence (blocks of one token)
    per_token: bool = False  # `delta` has one position per token of `tokens`
    seq_dim: int = 2
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


def _seq_cat(node, seq_dim: int) -> list[fx.Node] | None:
    if not is_call(node, aten.cat.default):
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    return list(node.args[0]) if val(node).dim() == 4 and dim % 4 == seq_dim else None


def _seq_major(node) -> fx.Node | None:
    """x when `node` is x [batch, len, kv_heads, dim] transposed to [batch, kv_heads, len, dim] (the original Llama
    code's `keys.transpose(1, 2)`), else None."""
    if not (isinstance(val(node), torch.Tensor) and val(node).dim() == 4):
        return None
    if is_call(node, aten.transpose.int) and sorted(d % 4 for d in node.args[1:3]) == [1, 2]:
        return node.args[0]
    if is_call(node, aten.permute.default) and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]:
        return node.args[0]
    return None


def _int_index(idx) -> bool:
    return isinstance(val(idx), torch.Tensor) and val(idx).dim() == 1 and not val(idx).is_floating_point() \
        and val(idx).dtype != torch.bool


def _row_table(node) -> tuple[fx.Node, fx.Node] | None:
    """(source, index) when `node` selects batch rows of `source` by an integer index tensor."""
    if is_call(node, aten.index_select.default) and node.args[1] == 0:
        return node.args[0], node.args[2]
    if is_call(node, aten.index.Tensor) and len(node.args[1]) == 1 and node.args[1][0] is not None:
        idx = node.args[1][0]
        if _int_index(idx):
            return node.args[0], idx
    return None


def _token_table(node, seq_dim: int) -> tuple[fx.Node, fx.Node] | None:
    """(source, index) when `node` selects tokens of `source` along the sequence dim by a 1-D integer index."""
    if is_call(node, aten.index_select.default) and node.args[1] % 4 == seq_dim and _int_index(node.args[2]):
        return node.args[0], node.args[2]
    if is_call(node, aten.index.Tensor):
        idx = list(node.args[1])
        if len(idx) == seq_dim + 1 and all(i is None for i in idx[:seq_dim]) and _int_index(idx[seq_dim]):
            return node.args[0], idx[seq_dim]
    return None


def _merges_into_tokens(source: fx.Node, seq_dim: int) -> bool:
    """Whether a cache [B, len, ...] (sequence at `seq_dim`) is [B * len, 1, Hkv, D] blocks of one token as a view:
    one row, or rows exactly len sequence steps apart."""
    sizes, strides = shape(source), val(source).stride()
    return known_equal(sizes[0], 1) or known_equal(strides[0], sizes[seq_dim] * strides[seq_dim])


def _cached_tokens(node, seq_dim: int) -> tuple[fx.Node, fx.Node] | None:
    """(source, index) when `node` gathers tokens of a tensor that can be read in place as blocks of one token (the
    tensor whose rows a table selects, where one does)."""
    found = _token_table(ident_root(node), seq_dim)
    if found is None:
        return None
    rows = _row_table(ident_root(found[0]))
    return found if _merges_into_tokens(rows[0] if rows is not None else found[0], seq_dim) else None


def _strip_casts(node):
    """Walk back through float conversions (a cache read in bfloat16 and rotated in float32)."""
    while is_call(node, *CONVERTS) and val(node).is_floating_point() and val(node.args[0]).is_floating_point():
        node = node.args[0]
    return node


def _per_row(rope) -> bool:
    """A RoPE that can be a re-rotation of whole rows: one angle per row (cos [.., 1, 1, F]).  Otherwise (per-token
    positions) it is the rotation that made these keys, kept as it is, unless a token index gathered them."""
    cos_shape = tuple(val(rope.cos).shape)
    return len(cos_shape) >= 2 and known_equal(cos_shape[-2], 1) and (
        len(cos_shape) < 3 or known_equal(cos_shape[-3], 1))


def _expected_angles(rope: RopeMatch, pos: torch.Tensor, inv: torch.Tensor, target: tuple[int, ...],
                     seq_dim: int, trig) -> torch.Tensor:
    """trig(pos[token] * inv[frequency of the column]) at every element of `target`, the rotated operand's shape
    (the complex form's [..., d/2]: one column per frequency; pairs: rotate-half repeats the frequencies, the
    interleaved form doubles each)."""
    columns = torch.arange(target[-1])
    if rope.kind != "complex":
        columns = columns // 2 if rope.interleaved else columns % (target[-1] // 2)
    angles = pos.double().reshape(-1, 1) * inv.double().reshape(-1)[columns]  # [tokens, columns]
    view = [1] * len(target)
    view[seq_dim], view[-1] = target[seq_dim], target[-1]
    return trig(angles).reshape(view).expand(target)


@real_mode
def _prove_token_angles(rope: RopeMatch, positions: fx.Node, inv_freq: fx.Node, seq_dim: int) -> None:
    """AnalysisError unless token i of the rotated keys turns by positions[i] * inv_freq, each frequency at the
    columns of its pair: the cos/sin (or freqs) chain evaluated on probe values, once with distinct positions (the
    token map) and once with distinct frequencies (the column map), each kept in (1.2, 2.4) rad where the cosine is
    one-to-one and its steps are far above float32 rounding."""
    complex_form = rope.kind == "complex"
    operand = rope.out.args[0] if complex_form else rope.x  # complex: the product [..., d/2]
    checks = [(rope.cos, (lambda a: torch.polar(torch.ones_like(a), a)) if complex_form else torch.cos)]
    if rope.sin is not None:
        checks.append((rope.sin, torch.sin))
    for env in size_envs(positions.graph):
        target = concrete_shape(operand, env)
        if not complex_form:  # the rotated columns (partial rotary leaves the rest)
            target = (*target[:-1], rope.rotary_dim)
        n, count = target[seq_dim], concrete(val(inv_freq).numel(), env)
        pos_shape, inv_shape = concrete_shape(positions, env), concrete_shape(inv_freq, env)
        probes = ((torch.arange(n, 2 * n), torch.full((count,), 1.2 / n)),
                  (torch.ones(n, dtype=torch.int64), 1.2 + 1.2 * torch.arange(count) / count))
        for pos, inv in probes:
            given = {positions: pos.to(val(positions).dtype).reshape(pos_shape),
                     inv_freq: inv.to(val(inv_freq).dtype).reshape(inv_shape)}
            for node, trig in checks:
                try:
                    got = const_eval(node, None, env, given)
                    got = torch.broadcast_to(got, target)
                except (AnalysisError, RuntimeError) as exc:
                    raise AnalysisError(f"the per-token re-rotation's angles could not be traced ({exc})") from exc
                want = _expected_angles(rope, pos, inv, target, seq_dim, trig).to(got.dtype)
                if not torch.allclose(got, want, rtol=0, atol=1e-5):
                    raise AnalysisError("the re-rotation's angles are not positions[token] * inv_freq per token "
                                        "and frequency")


def _rerotation(k: fx.Node, seq_dim: int) -> tuple[RopeMatch, fx.Node, fx.Node | None] | None:
    """(rope, cached keys, token index) when `k` is cached keys (gathered by a token index or not) rotated again:
    the signature of position shifting.  Any other RoPE is the rotation that made these keys (None)."""
    rotated = _strip_casts(k)
    rope = match_rope(rotated)
    if rope is None or rope.cos is None or not known_equal(shape(rope.x), shape(k)):
        return None
    x = _strip_casts(rope.x)
    if val(x).dtype != val(k).dtype:  # rotated in another dtype and kept so: the pool would not be the keys' dtype
        x = rope.x
    gathered = _cached_tokens(x, seq_dim)
    if gathered is not None and _rows_of_cache(gathered[0]):
        tokens = gathered[1]
    elif _is_cache_source(x) and _per_row(rope):
        tokens = None
    else:
        return None
    flat = (lambda t, _dims: t.flatten(-2)) if rope.kind == "complex" else (lambda t, _dims: t)
    try:  # the keys are the rotation's output as it is (only views between), not a permutation of it
        probe_chain(rope.out, rotated, flat)
    except (AnalysisError, RuntimeError) as exc:
        raise AnalysisError(f"the re-rotated keys are not laid out as the rotation's output ({exc})") from exc
    return rope, x, tokens


def _rows_of_cache(node) -> bool:
    """A cache source, or rows of one selected by a table."""
    rows = _row_table(ident_root(node))
    return _is_cache_source(node) or (rows is not None and _is_cache_source(rows[0]))


def _shift_of(piece: Piece, rope: RopeMatch, tokens: fx.Node | None, plan: KVPlan) -> None:
    """Record the re-rotation `rope` of `piece` (its delta, basis and layout), or AnalysisError naming what breaks
    the one-integer-per-block form."""
    angle = rope.angle()
    if angle is None or angle.kind != "inv_freq":
        reason = "dynamic inv_freq (it depends on the sequence length)" if angle and angle.kind == "dynamic" \
            else f"cos/sin of the re-rotation come from a {angle.kind if angle else 'unknown'} source"
        raise AnalysisError(f"cached keys are re-rotated but {reason}")
    if angle.factor != 1.0:
        raise AnalysisError(f"cached keys are re-rotated with a scaled cos/sin (factor {angle.factor})")
    numel = val(angle.positions).numel()
    if tokens is not None and not known_equal(numel, 1):  # one delta for all is the same for every layout
        if not known_equal(numel, val(tokens).numel()):
            raise AnalysisError("the re-rotation of the gathered tokens is not one integer per token")
        _prove_token_angles(rope, angle.positions, angle.inv_freq, piece.seq_dim)
        piece.per_token = True
    elif not (known_equal(numel, 1) or known_equal(numel, shape(piece.k)[0])):
        raise AnalysisError("the re-rotation delta is not one integer per row")
    piece.delta, piece.inv_freq = angle.positions, angle.inv_freq
    piece.rotary_dim, piece.interleaved = rope.rotary_dim, rope.interleaved
    piece.kinds.append(f"rerotation({rope.kind}{', per token' if piece.per_token else ''})")
    plan.gather_nodes.append(rope.out)


def _same_gather(k_found, v_found, what: str) -> None:
    if (k_found is None) != (v_found is None) or (k_found and k_found[1] is not v_found[1]):
        raise AnalysisError(f"keys and values are gathered by different {what}")


def _piece(k: fx.Node, v: fx.Node, plan: KVPlan, seq_dim: int) -> Piece:
    length = shape(k)[seq_dim]
    if not known_equal(shape(v)[seq_dim], length):
        raise AnalysisError("keys and values pieces have different lengths")
    piece = Piece(k, v, length, seq_dim=seq_dim)
    found = _rerotation(k, seq_dim)
    if found is not None:
        rope, piece.k, tokens = found
        _shift_of(piece, rope, tokens, plan)
    k_tokens, v_tokens = _cached_tokens(piece.k, seq_dim), _cached_tokens(piece.v, seq_dim)
    _same_gather(k_tokens, v_tokens, "token indices")
    if k_tokens is not None:
        plan.gather_nodes += [ident_root(piece.k), ident_root(piece.v)]
        piece.k, piece.v, piece.tokens = k_tokens[0], v_tokens[0], k_tokens[1]
        piece.kinds.append("index_select(tokens)")
    k_rows, v_rows = _row_table(ident_root(piece.k)), _row_table(ident_root(piece.v))
    _same_gather(k_rows, v_rows, "tables")
    if k_rows is not None:
        plan.gather_nodes += [ident_root(piece.k), ident_root(piece.v)]
        rows_of = piece.k
        piece.k, piece.v, piece.table = k_rows[0], v_rows[0], k_rows[1]
        if not known_equal(shape(piece.k)[1:], shape(rows_of)[1:]):
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
    seq_dim = 2
    src_k, src_v = _seq_major(mat_k), _seq_major(mat_v)
    if (src_k is None) != (src_v is None):
        raise AnalysisError("keys and values are laid out differently (one is transposed from [batch, len, heads, "
                            "dim], the other not)")
    if src_k is not None:
        k, v, seq_dim = src_k, src_v, 1
        mat_k, mat_v = ident_root(k), ident_root(v)
    k_parts, v_parts = _seq_cat(mat_k, seq_dim), _seq_cat(mat_v, seq_dim)
    if k_parts is not None or v_parts is not None:
        if k_parts is None or v_parts is None or len(k_parts) != len(v_parts):
            raise AnalysisError("keys and values are concatenated differently")
        plan.gather_nodes += [mat_k, mat_v]
        plan.kinds.append("cat")
        plan.from_cache = True
        parts = [(a, b) for a, b in zip(k_parts, v_parts, strict=True) if not known_equal(shape(a)[seq_dim], 0)]
    else:
        parts = [(k, v)]
    for a, b in parts:
        plan.pieces.append(_piece(a, b, plan, seq_dim))
    return plan
