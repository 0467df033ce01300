"""Real-valued (learnable) block deltas: exact angles, and d out / d delta exact on every implementation.

gradcheck compares each implementation's analytic gradients (the op's one adjoint, `attention_backward`, and
`materialize_kv`'s) with central finite differences of that implementation's own forward, in float64, over
random shapes, tables, deltas and both rotary layouts; the reference's gradients come from autograd through its
torch ops, written independently of the adjoint.
"""

from __future__ import annotations

import os
import re

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugecompile as gc
from gaugecompile.ops.materialize import materialize_kv
from gaugecompile.rope import MAX_ABS_DELTA, reduced_angles

CPU_IMPLS = ["reference", "auto", "native", "loop"]
#: The finite-difference step: a power of two, so that delta +- EPS is exact even for the delta above 2^20.
EPS = 2.0**-20


def _case(seed: int, *, batch: int, kv_heads: int, group: int, q_len: int, head_dim: int, rotary_dim: int,
          block_size: int, width: int, interleaved: bool):
    """float64 inputs with ragged entries (empty ones anywhere: their delta must get no gradient) and real deltas,
    some repeated (one rotation shared by a run of entries), some zero, one above 2^20."""
    g = torch.Generator().manual_seed(seed)
    q_len = min(q_len, width * block_size)
    pool_blocks = batch * width + 1
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=g, dtype=torch.float64)
    k_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    table = torch.randperm(pool_blocks, generator=g)[: batch * width].view(batch, width)
    lens = torch.randint(0, block_size + 1, (batch, width), generator=g)
    lens[:, -1] = block_size
    lens[lens.sum(1) < q_len] = block_size  # every row holds at least the queries
    delta = (torch.rand(batch, width, generator=g, dtype=torch.float64) - 0.5) * 40
    delta[:, 0] = 0.0
    if width > 2:
        delta[:, 2] = delta[:, 1]
    delta[-1, -1] = 2.0**20 + 0.25  # +- EPS exactly: a finite difference there needs an exact step
    rope = gc.RopeSpec.from_base(500.0, rotary_dim, interleaved=interleaved)
    return q, k_pool, v_pool, table, delta, lens, rope


@st.composite
def cases(draw):
    head_dim = draw(st.sampled_from([12, 24]))  # head dims the native kernel tests build as well
    return dict(
        seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(1, 2)), kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2])), q_len=draw(st.sampled_from([1, 3])), head_dim=head_dim,
        rotary_dim=draw(st.sampled_from([head_dim, 4])), block_size=draw(st.sampled_from([1, 3, 4])),
        width=draw(st.integers(2, 4)), interleaved=draw(st.booleans()),
    )


@pytest.mark.parametrize("impl", CPU_IMPLS)
@settings(max_examples=5, deadline=None)
@given(c=cases(), causal=st.booleans())
def test_gradcheck_every_input_including_real_deltas(impl, c, causal):
    q, k_pool, v_pool, table, delta, lens, rope = _case(**c)

    def attention(q, k_pool, v_pool, delta):
        return gc.rotated_query_attention(q, k_pool, v_pool, table, delta, lens, rope, causal=causal, impl=impl,
                                          return_lse=True)

    q, k_pool, v_pool, delta = (t.requires_grad_() for t in (q, k_pool, v_pool, delta))
    # q and the deltas element by element (steps that keep every delta exact); the pools, thousands of elements,
    # along random projections
    assert torch.autograd.gradcheck(lambda q, delta: attention(q, k_pool, v_pool, delta), (q, delta), eps=EPS,
                                    atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda k, v: attention(q, k, v, delta), (k_pool, v_pool), fast_mode=True,
                                    eps=EPS, atol=1e-7, rtol=1e-5)


def test_empty_entries_get_no_delta_gradient():
    q, k_pool, v_pool, table, delta, lens, rope = _case(3, batch=2, kv_heads=1, group=2, q_len=1, head_dim=12,
                                                        rotary_dim=12, block_size=4, width=4, interleaved=False)
    lens[:, 1] = 0
    delta.requires_grad_()
    for impl in CPU_IMPLS:
        out = gc.rotated_query_attention(q, k_pool, v_pool, table, delta, lens, rope, impl=impl)
        (grad,) = torch.autograd.grad(out.square().sum(), delta)
        assert (grad[:, 1] == 0).all() and (grad[:, [0, 2, 3]] != 0).any(), impl


@pytest.mark.skipif(os.environ.get("GAUGECOMPILE_TRITON_DEVICE") == "cuda", reason="the GPU check runs its own")
def test_gradcheck_triton_kernels_real_deltas():
    """The generated kernels (interpreted here: slow, so one small case) take real deltas' angles from torch and
    share the op's adjoint: the deltas element by element, q along a random projection."""
    q, k_pool, v_pool, table, delta, lens, rope = _case(5, batch=2, kv_heads=1, group=2, q_len=2, head_dim=16,
                                                        rotary_dim=8, block_size=4, width=3, interleaved=True)

    def attention(q, delta):
        return gc.rotated_query_attention(q, k_pool, v_pool, table, delta, lens, rope, impl="triton", return_lse=True)

    q, delta = q.requires_grad_(), delta.requires_grad_()
    assert torch.autograd.gradcheck(lambda delta: attention(q, delta), (delta,), eps=EPS, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda q: attention(q, delta), (q,), fast_mode=True, eps=EPS, atol=1e-7,
                                    rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(c=cases())
def test_gradcheck_materialize_kv_real_deltas(c):
    _, k_pool, v_pool, table, delta, lens, rope = _case(**c)
    length = int(lens[0].sum())
    lens[:] = lens[0]  # materialize_kv: one view length for every row

    def gather(k_pool, v_pool, delta):
        return materialize_kv(k_pool, v_pool, table, delta, rope, length, lens)

    k_pool, v_pool, delta = (t.requires_grad_() for t in (k_pool, v_pool, delta))
    assert torch.autograd.gradcheck(lambda delta: gather(k_pool, v_pool, delta), (delta,), eps=EPS, atol=1e-7,
                                    rtol=1e-5)
    assert torch.autograd.gradcheck(lambda k, v: gather(k, v, delta), (k_pool, v_pool), fast_mode=True, eps=EPS,
                                    atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_whole_real_deltas_equal_integer_deltas_bitwise(impl):
    q, k_pool, v_pool, table, delta, lens, rope = _case(7, batch=2, kv_heads=2, group=2, q_len=3, head_dim=24,
                                                        rotary_dim=24, block_size=4, width=4, interleaved=False)
    whole = delta.round()
    real = gc.rotated_query_attention(q, k_pool, v_pool, table, whole, lens, rope, impl=impl, return_lse=True)
    integer = gc.rotated_query_attention(q, k_pool, v_pool, table, whole.to(torch.int64), lens, rope, impl=impl,
                                         return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(real, integer, strict=True))


@settings(max_examples=200, deadline=None)
@given(whole=st.integers(-MAX_ABS_DELTA, MAX_ABS_DELTA - 1), fraction=st.floats(0, 1, exclude_max=True),
       theta=st.floats(1e-6, 1.0))
def test_real_delta_angles_exact(whole, fraction, theta):
    """The angle of a real delta (any float64 in range) against 60-digit arithmetic: the whole part keeps the
    integer reduction's accuracy."""
    delta = float(whole) + fraction  # rounded to float64: the delta is whatever float64 this is
    as_tensor = torch.tensor([delta], dtype=torch.float64), torch.tensor([theta], dtype=torch.float64)
    got = float(reduced_angles(*as_tensor)[0, 0])
    with mpmath.workdps(60):
        exact = mpmath.mpf(delta) * mpmath.mpf(theta)
        exact -= 2 * mpmath.pi * mpmath.nint(exact / (2 * mpmath.pi))
        assert abs(got - float(exact)) < 1e-12


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(("bad", "message"), [(float("nan"), "finite"), (float("inf"), "finite"),
                                              (2.0**31, "2^31"), (-(2.0**31) - 0.5, "2^31")])
def test_bad_real_deltas_are_named_and_change_nothing(impl, bad, message):
    q, k_pool, v_pool, table, delta, lens, rope = _case(9, batch=1, kv_heads=1, group=1, q_len=1, head_dim=12,
                                                        rotary_dim=12, block_size=4, width=3, interleaved=False)
    delta[0, 1] = bad
    before = [t.clone() for t in (q, k_pool, v_pool, table, delta, lens)]
    with pytest.raises(ValueError, match=f"block_delta.*{re.escape(message)}"):
        gc.rotated_query_attention(q, k_pool, v_pool, table, delta, lens, rope, impl=impl)
    for a, b in zip(before, (q, k_pool, v_pool, table, delta, lens), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def test_half_precision_deltas_are_refused():
    q, k_pool, v_pool, table, delta, lens, rope = _case(1, batch=1, kv_heads=1, group=1, q_len=1, head_dim=12,
                                                        rotary_dim=12, block_size=4, width=2, interleaved=False)
    with pytest.raises(TypeError, match="block_delta: expected an int32/int64 tensor .*float32/float64"):
        gc.rotated_query_attention(q, k_pool, v_pool, table, delta.half(), lens, rope)
