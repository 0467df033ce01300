"""The op over every KV format (`gaugecompile.kv_format`): compressed pools read and dequantized in registers equal
the float64 reference over the dequantized pools, and quantization rounds as its definition says."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_op_exactness import cases, make_case, rel_err

import gaugecompile as gc
from gaugecompile.block_tables import view_tokens
from gaugecompile.kv_format import FORMATS, SCALE_DTYPE, dequantize, group_size, kv_format, quantize

COMPRESSED = ("int8", "float8_e4m3fn", "int4")
#: Every format a float32 or bfloat16 model may read (float64 pools go with float64 queries only).
POOL_FORMATS = ("float32", "bfloat16", "float16", *COMPRESSED)


@settings(max_examples=40)
@given(fmt=st.sampled_from(COMPRESSED), rows=st.integers(1, 5), head_dim=st.sampled_from([8, 24, 32, 64, 96]),
       magnitude=st.sampled_from([1e-2, 1.0, 300.0]), seed=st.integers(0, 2**31))
def test_quantize_rounds_each_group_to_its_grid(fmt, rows, head_dim, magnitude, seed):
    """Codes are round(x / scale) (float8: x / scale rounded to e4m3fn) and dequantize to code * scale exactly."""
    f = kv_format(fmt)
    x = torch.randn(rows, 3, head_dim, generator=torch.Generator().manual_seed(seed)) * magnitude
    codes, scale = quantize(x, f)
    g = group_size(head_dim)
    assert scale.dtype == SCALE_DTYPE and scale.shape == (rows, 3, head_dim // g)
    assert codes.shape == (rows, 3, f.pool_width(head_dim)) and codes.dtype == f.storage
    y = dequantize(codes, scale)
    step = scale.float().abs().repeat_interleave(g, -1)
    err = (y - x).abs()
    if fmt == "float8_e4m3fn":  # 3 mantissa bits: half a unit in the last place, relative
        assert bool((err <= x.abs() * 2**-4 + step * 2**-9 + 1e-30).all())
    else:  # half a step; int4's grid is [-8, 7] steps with the group's extreme at -8, so only a value of the other
        # sign near the extreme's magnitude is clipped to 7, at most a step away (llama.cpp's Q4_0 makes the same trade)
        inside = (x.abs() <= step * 7.5) if fmt == "int4" else torch.ones_like(x, dtype=torch.bool)
        assert bool((err[inside] <= step[inside] / 2 * (1 + 1e-6) + 1e-30).all())
        assert bool((err <= step * (1 + 1e-6) + 1e-30).all())
    assert torch.equal(dequantize(codes, scale, torch.float64), y.double())  # the products are exact in float32


def _compressed(k: torch.Tensor, v: torch.Tensor, fmt: str):
    f = kv_format(fmt)
    kc, ks = quantize(k.float(), f)
    vc, vs = quantize(v.float(), f)
    return kc, vc, ks, vs


def _case(fmt: str, **params):
    """A float32 case of `make_case` with its pools in `fmt`: (q, (kc, vc, ks, vs), table, delta, lens, inv_freq)."""
    (q, k, v, table, delta, lens), inv_freq = make_case(None, dtype=torch.float32, **params)
    return q, _compressed(k, v, fmt), table, delta, lens, inv_freq


@pytest.mark.parametrize("impl", ["auto", "loop"])
@settings(max_examples=40)
@given(case=cases(dtypes=(torch.float32, torch.bfloat16)), fmt=st.sampled_from(POOL_FORMATS))
def test_op_over_every_format_is_the_reference_over_its_values(impl, case, fmt):
    """Any float query dtype over any pool format: the float64 reference over the dequantized pools."""
    params, interleaved, causal = case
    (q, k, v, table, delta, lens), inv_freq = make_case(None, **params)
    if params["q_len"] > int(lens.min()):
        return
    kc, vc, ks, vs = _compressed(k, v, fmt)
    rope = gc.RopeSpec(inv_freq, params["rotary_dim"], interleaved)
    out, lse = gc.rotated_query_attention(q, kc, vc, table, delta, lens, rope, causal=causal, k_scale=ks, v_scale=vs,
                                          impl=impl, return_lse=True)
    ref, ref_lse = gc.reference_attention(q.double(), dequantize(kc, ks, torch.float64),
                                          dequantize(vc, vs, torch.float64), table, delta, lens, rope, causal=causal,
                                          return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = 1e-5 if q.dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) <= tol, (rel_err(out, ref), fmt, params)
    assert float((lse.double() - ref_lse).abs().max()) <= (1e-4 if q.dtype == torch.float32 else 2e-2) * max(
        1.0, float(ref_lse.abs().max()))


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_reference_and_native_agree_on_compressed_pools(fmt):
    """reference_attention takes the scales too (it dequantizes first, then is the definition)."""
    q, (kc, vc, ks, vs), table, delta, lens, inv_freq = _case(
        fmt, batch=2, heads=4, group=2, q_len=3, head_dim=64, rotary_dim=32, block_size=4, blocks_per_seq=5,
        pool_blocks=8, table_kind="ragged", delta_range=(-99, 99), seed=3)
    rope = gc.RopeSpec(inv_freq, 32, True)
    a = gc.rotated_query_attention(q, kc, vc, table, delta, lens, rope, k_scale=ks, v_scale=vs, impl="native")
    b = gc.reference_attention(q, kc, vc, table, delta, lens, rope, k_scale=ks, v_scale=vs)
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("fmt", POOL_FORMATS)
def test_materialize_dequantizes_then_rerotates(fmt):
    """materialize_kv over any format (native kernel and torch ops) is dequantize + re-rotate, in the dtype asked."""
    from gaugecompile.ops.materialize import materialize_views
    from gaugecompile.ops.reference import rerotate

    _, (kc, vc, ks, vs), table, delta, lens, inv_freq = _case(
        fmt, batch=2, heads=2, group=1, q_len=1, head_dim=32, rotary_dim=32, block_size=4, blocks_per_seq=3,
        pool_blocks=6, table_kind="ragged", delta_range=(-50, 50), seed=5)
    rope = gc.RopeSpec(inv_freq, 32, False)
    length = int(lens.sum(1)[0])
    lens[1] = lens[0]
    for dtype in (torch.float32, torch.bfloat16):
        native = gc.materialize_kv(kc, vc, table, delta, rope, length, lens, k_scale=ks, v_scale=vs, dtype=dtype)
        views = materialize_views(kc, vc, table, delta, lens, inv_freq, 32, False, length, ks, vs, dtype)
        for b in range(2):
            slots, deltas = view_tokens(table[b], delta[b], lens[b], 4)
            want_k = rerotate(dequantize(kc.flatten(0, 1)[slots], None if ks is None else ks.flatten(0, 1)[slots],
                                         torch.float64), deltas, inv_freq, 32, False)
            want_v = dequantize(vc.flatten(0, 1)[slots], None if vs is None else vs.flatten(0, 1)[slots],
                                torch.float64)
            for got in (native, views):
                assert got[0].dtype == dtype
                tol = 1e-6 if dtype == torch.float32 else 1e-2
                assert rel_err(got[0][b].transpose(0, 1), want_k) < tol
                assert rel_err(got[1][b].transpose(0, 1), want_v) < tol


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_gradients_over_compressed_pools_are_those_over_their_values(fmt):
    """The backward where deltas are learnable: dq and d delta over codes equal those over the dequantized pools
    (float32 both); the codes themselves get none."""
    q, (kc, vc, ks, vs), table, delta, lens, inv_freq = _case(
        fmt, batch=2, heads=4, group=2, q_len=2, head_dim=32, rotary_dim=32, block_size=4, blocks_per_seq=3,
        pool_blocks=5, table_kind="contiguous", delta_range=(-20, 20), seed=11)
    rope = gc.RopeSpec(inv_freq, 32, False)
    grads = []
    for pools in ((kc, vc, ks, vs), (dequantize(kc, ks), dequantize(vc, vs), None, None)):
        qq = q.clone().requires_grad_()
        dd = delta.double().requires_grad_()
        out = gc.rotated_query_attention(qq, pools[0], pools[1], table, dd, lens, rope, k_scale=pools[2],
                                         v_scale=pools[3])
        out.square().sum().backward()
        grads.append((qq.grad, dd.grad))
    assert rel_err(grads[0][0], grads[1][0]) < 1e-5
    assert rel_err(grads[0][1], grads[1][1]) < 1e-4


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_opcheck_with_scales(fmt):
    """Schema, fake kernel and autograd registration agree for compressed pools (torch.library.opcheck)."""
    q, (kc, vc, ks, vs), table, delta, lens, inv_freq = _case(
        fmt, batch=1, heads=2, group=2, q_len=2, head_dim=32, rotary_dim=16, block_size=4, blocks_per_seq=2,
        pool_blocks=3, table_kind="contiguous", delta_range=(-5, 5), seed=2)
    args = (q, kc, vc, table, delta, lens, inv_freq, 16, False, 0.2, True, 0, 0.0, ks, vs)
    # test_schema compares the inputs before and after with allclose, which float8 tensors do not implement
    utils = [u for u in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if fmt != "float8_e4m3fn" or u != "test_schema"]
    torch.library.opcheck(torch.ops.gauge.rotated_query_attention.default, args, test_utils=utils)
    view_args = (kc, vc, table, delta, lens, inv_freq, 16, False, 8, ks, vs, torch.bfloat16)
    torch.library.opcheck(torch.ops.gauge.materialize_kv.default, view_args, test_utils=utils)


def _bad_cases():
    k = torch.randn(3, 4, 1, 32)
    kc, ks = quantize(k, kv_format("int8"))
    return [
        (dict(k_pool=kc, v_pool=kc), ValueError, "k_scale: the int8 pool needs its scales"),
        (dict(k_pool=kc, v_pool=kc, k_scale=ks, v_scale=ks.float()), ValueError, "v_scale: expected torch.bfloat16"),
        (dict(k_pool=kc, v_pool=kc, k_scale=ks[:2], v_scale=ks), ValueError, "k_scale: expected"),
        (dict(k_pool=k, v_pool=k, k_scale=ks), ValueError, "k_scale: a torch.float32 pool has no scales"),
        (dict(k_pool=kc, v_pool=k, k_scale=ks), ValueError, "v_scale: a torch.float32 pool has no scales|v_pool"),
        (dict(k_pool=k.to(torch.int32), v_pool=k.to(torch.int32)), TypeError, "k_pool: expected a pool of one of"),
        (dict(k_pool=k.double(), v_pool=k.double()), TypeError, "k_pool: float64 queries go with float64 pools"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_pools_and_scales_are_named(index):
    pools, error, match = _bad_cases()[index]
    q = torch.randn(1, 2, 1, 32)
    table, delta, lens = torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), torch.tensor([[4, 2]])
    rope = gc.RopeSpec.from_base(10000.0, 32)
    kwargs = {k: v for k, v in pools.items() if k.endswith("scale")}
    with pytest.raises((TypeError, ValueError), match=match) as caught:
        gc.rotated_query_attention(q, pools["k_pool"], pools["v_pool"], table, delta, lens, rope, **kwargs)
    assert isinstance(caught.value, (TypeError, ValueError))


def test_the_kernel_checks_scales_itself():
    """A compiled graph or an exported program calls the kernel without the Python checks: it names the scales."""
    from gaugecompile.codegen.native import native_library
    from gaugecompile.codegen.spec import KernelSpec

    lib = native_library(KernelSpec(32, 32, False, 4, 1, "float32"))
    kc, ks = quantize(torch.randn(2, 4, 1, 32), kv_format("int8"))
    q = torch.randn(1, 1, 1, 32)
    mapping = (torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[4]]))
    with pytest.raises(ValueError, match="k_scale: a Char pool needs its scales"):
        lib.attention(q, kc, kc, *mapping, None, None, 0.1, True, 0, 0.0, False, None, None)
    with pytest.raises(ValueError, match="v_scale: expected bfloat16 scales"):
        lib.attention(q, kc, kc, *mapping, None, None, 0.1, True, 0, 0.0, False, ks, ks[..., :0])


def test_every_format_is_named_by_its_kv_dtype():
    assert set(FORMATS) == {"float64", "float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "int4"}
    assert kv_format(torch.int8) is FORMATS["int8"] and kv_format("int4").packing == 2
    with pytest.raises(ValueError, match="kv_dtype: expected one of"):
        kv_format(torch.uint8)  # int4 is named, not its packed storage
