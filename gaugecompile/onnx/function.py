"""The meaning of `ai.gauge::RotatedQueryAttention` in standard ONNX ops (a model-local function).

Node contract (domain `ai.gauge`, version 2):

    inputs:  q [B, H, Q, D], k_pool [N, S, Hkv, D], v_pool [N, S, Hkv, D] (dtype of q),
             block_table [B, M], block_delta [B, M] and block_lens [B, M] (int32/int64),
             inv_freq [rotary_dim // 2] (float64)
    outputs: out [B, H, Q, D] and lse [B, H, Q], both in the dtype of q
    attributes: rotary_dim (int), interleaved (int 0/1), scale (float), causal (int 0/1),
             block_size (int, = S; informative for runtimes that bind a fused kernel)

The body is the reference: entry j of a sequence is slots [0, block_lens[j]) of block block_table[j];
gather every entry's block, re-rotate every key by its entry's delta, GQA by grouping query heads,
hide the slots an entry does not hold (and, if causal, bottom-right: query i of Q sits at position
seq_len - Q + i, a held slot's position being the number of held slots before it), softmax, output and
log-sum-exp.  Entries holding no tokens are never read (their ids are replaced by 0).  Version 1 took
view lengths `seq_lens` [B] (every block full but the last) in place of `block_lens`.

Angles reproduce `gaugecompile.rope.reduced_angles` op for op in float64: the delta is split
into 16-bit halves, the frequency by Veltkamp splitting, each of the four exact products is
reduced modulo 2*pi with the same three-part Cody-Waite constant; only then cos/sin, cast to
the dtype of q.  So deltas up to 2^31 keep ~1e-15 rad, as in every other implementation.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxscript
from onnx import TensorProto
from onnxscript import opset20 as op
from onnxscript.values import Opset

from ..rope import INV_TWO_PI, TWO_PI_PARTS, VELTKAMP

__all__ = ["DOMAIN", "OP_TYPE", "VERSION", "MIN_OPSET", "function_proto"]

DOMAIN = "ai.gauge"
OP_TYPE = "RotatedQueryAttention"
VERSION = 2
#: Oldest standard opset whose ops (Reduce* with axes as inputs) the body uses.
MIN_OPSET = 18

_gauge = Opset(DOMAIN, VERSION)


def _f64(name: str, value: float) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(value, dtype=np.float64), name)


def _i64(name: str, value: list[int]) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), name)


_K_C1, _K_C2, _K_C3 = (_f64(f"c{i + 1}", c) for i, c in enumerate(TWO_PI_PARTS))
_K_INV_TWO_PI, _K_VELTKAMP = _f64("inv_two_pi", INV_TWO_PI), _f64("veltkamp", VELTKAMP)
_K_2P16, _K_2M16 = _f64("two_16", 65536.0), _f64("two_m16", 1.0 / 65536.0)
_ZERO, _ONE, _TWO = _i64("zero", [0]), _i64("one", [1]), _i64("two", [2])
_MINUS1 = _i64("minus_one", [-1])
_S0, _S1, _S2 = (onnx.numpy_helper.from_array(np.array(v, dtype=np.int64), f"s{v}") for v in (0, 1, 2))
_AXES_23, _AXES_12, _AXES_01 = _i64("axes_23", [2, 3]), _i64("axes_12", [1, 2]), _i64("axes_01", [0, 1])


@onnxscript.script(_gauge, default_opset=op)
def ReduceTwoPi(p):  # noqa: N802 -- an ONNX function name
    """p mod 2*pi into [-pi, pi] (Cody-Waite), as `rope._reduce`."""
    k = op.Round(p * op.Constant(value=_K_INV_TWO_PI))
    return ((p - k * op.Constant(value=_K_C1)) - k * op.Constant(value=_K_C2)) - k * op.Constant(value=_K_C3)


@onnxscript.script(_gauge, default_opset=op)
def RotatedQueryAttention(  # noqa: N802 -- the ONNX op name
    q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq,
    rotary_dim: int, interleaved: int, scale: float, causal: int, block_size: int,
):
    zero = op.Constant(value=_ZERO)
    one = op.Constant(value=_ONE)
    two = op.Constant(value=_TWO)
    minus1 = op.Constant(value=_MINUS1)
    batch = op.Shape(q, start=0, end=1)
    heads = op.Shape(q, start=1, end=2)
    q_len = op.Shape(q, start=2, end=3)
    head_dim = op.Shape(q, start=3, end=4)
    size = op.Shape(k_pool, start=1, end=2)
    kv_heads = op.Shape(k_pool, start=2, end=3)
    max_blocks = op.Shape(block_table, start=1, end=2)
    group = op.Div(heads, kv_heads)
    s0 = op.Constant(value=_S0)
    s1 = op.Constant(value=_S1)
    s2 = op.Constant(value=_S2)

    # Entries that hold tokens; the others are never read.
    counts = op.Cast(block_lens, to=TensorProto.INT64)  # [B, M]
    used = op.Less(op.CastLike(zero, counts), counts)
    ids = op.Where(used, op.Cast(block_table, to=TensorProto.INT64), zero)
    delta = op.Where(used, op.Cast(block_delta, to=TensorProto.INT64), zero)

    # Exact float64 angles delta * inv_freq mod 2*pi, [B, M, F] (rope.reduced_angles).
    theta = op.Cast(inv_freq, to=TensorProto.DOUBLE)
    d = op.Unsqueeze(op.Cast(delta, to=TensorProto.DOUBLE), minus1)
    d_hi = op.Floor(d * op.Constant(value=_K_2M16)) * op.Constant(value=_K_2P16)
    d_lo = d - d_hi
    c = theta * op.Constant(value=_K_VELTKAMP)
    t_hi = c - (c - theta)
    t_lo = theta - t_hi
    total = ReduceTwoPi(d_hi * t_hi) + ReduceTwoPi(d_hi * t_lo) + ReduceTwoPi(d_lo * t_hi) + ReduceTwoPi(d_lo * t_lo)
    angle = ReduceTwoPi(total)
    cos = op.CastLike(op.Cos(angle), q)
    sin = op.CastLike(op.Sin(angle), q)

    # Per-dim rotation: out[i] = x[i] * cos[f(i)] + sign(i) * x[partner(i)] * sin[f(i)];
    # rotate-half pairs (i, i + F), interleaved pairs (2i, 2i + 1), dims >= rotary_dim pass through.
    dim = op.Range(s0, op.Squeeze(head_dim), s1)
    rdim = op.Constant(value_int=rotary_dim)
    half = op.Div(rdim, s2)
    inter = op.Cast(op.Constant(value_int=interleaved), to=TensorProto.BOOL)
    in_rot = op.Less(dim, rdim)
    first_half = op.Less(dim, half)
    odd = op.Mod(dim, s2)
    freq = op.Where(in_rot, op.Where(inter, op.Div(dim, s2), op.Mod(dim, half)), zero)
    partner_half = op.Where(first_half, dim + half, dim - half)
    partner = op.Where(in_rot, op.Where(inter, dim + s1 - odd * s2, partner_half), dim)
    sign = op.Where(in_rot, op.Where(inter, odd * s2 - s1, op.Where(first_half, minus1, one)), zero)
    cos_d = op.Where(in_rot, op.Gather(cos, freq, axis=-1), op.CastLike(one, q))  # [B, M, D]
    sin_d = op.Gather(sin, freq, axis=-1) * op.CastLike(sign, q)
    cos_d = op.Unsqueeze(cos_d, op.Constant(value=_AXES_23))  # [B, M, 1, 1, D]
    sin_d = op.Unsqueeze(sin_d, op.Constant(value=_AXES_23))

    keys = op.Gather(k_pool, ids, axis=0)  # [B, M, S, Hkv, D]
    keys = keys * cos_d + op.Gather(keys, partner, axis=4) * sin_d
    values = op.Gather(v_pool, ids, axis=0)
    view_len = max_blocks * size
    view_shape = op.Concat(batch, view_len, kv_heads, head_dim, axis=0)
    keys = op.Unsqueeze(op.Transpose(op.Reshape(keys, view_shape), perm=[0, 2, 1, 3]), two)  # [B, Hkv, 1, L, D]
    values = op.Unsqueeze(op.Transpose(op.Reshape(values, view_shape), perm=[0, 2, 1, 3]), two)

    # GQA: query heads h = kv * group + g, so q reshapes to [B, Hkv, G, Q, D].
    q5 = op.Reshape(q, op.Concat(batch, kv_heads, group, q_len, head_dim, axis=0))
    scores = op.MatMul(q5, op.Transpose(keys, perm=[0, 1, 2, 4, 3]))
    scores = scores * op.CastLike(op.Constant(value_float=scale), q)  # [B, Hkv, G, Q, L]

    # A slot is a key of the view iff its entry holds it; its view position is the count of held slots before it.
    # Key p is visible to query i iff p < seq_len - (Q - 1 - i) * causal (bottom-right causal).
    slot = op.Range(s0, op.Squeeze(size), s1)
    held = op.Less(op.Unsqueeze(slot, op.Constant(value=_AXES_01)), op.Unsqueeze(counts, minus1))  # [B, M, S]
    held = op.Reshape(held, op.Concat(batch, view_len, axis=0))  # [B, L]
    key_pos = op.CumSum(op.Cast(held, to=TensorProto.INT64), one) - s1
    lens = op.ReduceSum(counts, one, keepdims=0)  # [B]
    q_idx = op.Range(s0, op.Squeeze(q_len), s1)
    back = (op.Squeeze(q_len) - s1 - q_idx) * op.Constant(value_int=causal)
    limit = op.Unsqueeze(lens, one) - op.Unsqueeze(back, zero)  # [B, Q]
    visible = op.And(op.Unsqueeze(held, one),
                     op.Less(op.Unsqueeze(key_pos, one), op.Unsqueeze(limit, minus1)))  # [B, Q, L]
    visible = op.Unsqueeze(visible, op.Constant(value=_AXES_12))
    scores = op.Where(visible, scores, op.CastLike(op.Constant(value_float=float("-inf")), q))

    peak = op.ReduceMax(scores, minus1, keepdims=1)
    weights = op.Exp(scores - peak)
    total_w = op.ReduceSum(weights, minus1, keepdims=1)
    out5 = op.MatMul(weights / total_w, values)  # [B, Hkv, G, Q, D]
    out = op.Reshape(out5, op.Shape(q))
    lse = op.Reshape(op.Log(total_w) + peak, op.Shape(q, start=0, end=3))
    return out, lse


def function_proto(opset: int) -> list[onnx.FunctionProto]:
    """The function (and its helper) as FunctionProtos importing standard opset `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset: the ai.gauge function needs standard opset >= {MIN_OPSET}, got {opset}")
    protos = [ReduceTwoPi.to_function_proto(), RotatedQueryAttention.to_function_proto()]
    for proto in protos:
        for imp in proto.opset_import:
            if imp.domain == "":
                imp.version = opset
    return protos
