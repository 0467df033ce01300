"""Attention variants in the rotated-query op, on every implementation, against a per-query loop written from their
definitions (not `masks.hidden_keys` / `soft_capped`): sliding windows (each query sees its last `window` view
tokens; the blocks no query's window reaches are never read: they hold NaN here, which any read would spread) and
logit soft-capping (`softcap * tanh(s / softcap)` of the scaled scores, before the mask)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_op_exactness import TOL, make_case, rel_err

import gaugecompile as gc
from gaugecompile.block_tables import view_tokens
from gaugecompile.ops.reference import rerotate

IMPLS = ["reference", "auto", "native", "loop", "triton"]


def per_query(q, k_pool, v_pool, table, delta, lens, rope, scale, causal, window, softcap=0.0):
    """Float64, one query at a time: re-rotate its view, keep the keys at positions p - window < j (<= p if causal),
    cap their scores, softmax over those alone."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_pool.shape[2]
    for b in range(q.shape[0]):
        slots, deltas = view_tokens(table[b], delta[b], lens[b], k_pool.shape[1])
        k = rerotate(k_pool.double().flatten(0, 1)[slots], deltas, rope.inv_freq, rope.rotary_dim, rope.interleaved)
        v = v_pool.double().flatten(0, 1)[slots]
        length, q_len = k.shape[0], q.shape[2]
        for t in range(q_len):
            p = length - q_len + t
            lo, hi = max(0, p - window + 1) if window else 0, (p + 1 if causal else length)
            for h in range(q.shape[1]):
                s = (k[lo:hi, h // group] @ q[b, h, t].double()) * scale
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                out[b, h, t] = torch.softmax(s, 0) @ v[lo:hi, h // group]
    return out


@st.composite
def window_cases(draw):
    group = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([16, 24, 64]))
    block_size = draw(st.sampled_from([1, 3, 4, 16]))
    blocks = draw(st.integers(1, max(1, 96 // block_size)))
    params = dict(
        batch=draw(st.integers(1, 3)), heads=group * draw(st.integers(1, 2)), group=group,
        q_len=draw(st.sampled_from([1, 1, 2, 5])), head_dim=head_dim,
        rotary_dim=draw(st.sampled_from([head_dim, head_dim // 2])), block_size=block_size, blocks_per_seq=blocks,
        pool_blocks=blocks + draw(st.integers(0, 3)), dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        table_kind=draw(st.sampled_from(["random", "shared", "contiguous", "beams", "ragged"])),
        delta_range=(-(2**31), 2**31), seed=draw(st.integers(0, 2**31)),
    )
    window = draw(st.one_of(st.just(0), st.integers(1, blocks * block_size + 2)))
    softcap = draw(st.sampled_from([0.0, 0.5, 2.0, 30.0]))
    return params, draw(st.booleans()), draw(st.booleans()), window, softcap


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None)
@given(case=window_cases())
def test_variants_equal_attention_over_each_querys_visible_tokens(impl, case):
    params, interleaved, causal, window, softcap = case
    (q, k, v, table, delta, lens), inv_freq = make_case(None, **params)
    if params["q_len"] > int(lens.sum(1).min()):
        return
    rope = gc.RopeSpec(inv_freq, params["rotary_dim"], interleaved)
    out = gc.rotated_query_attention(q, k, v, table, delta, lens, rope, causal=causal, window=window, softcap=softcap,
                                     impl=impl)
    want = per_query(q, k, v, table, delta, lens, rope, q.shape[-1] ** -0.5, causal, window, softcap)
    assert rel_err(out, want) < TOL[params["dtype"]] * 10


@pytest.mark.parametrize("impl", ["auto", "native", "loop", "triton"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_blocks_before_every_window_are_not_read(impl, q_len):
    g = torch.Generator().manual_seed(3)
    block_size, blocks, window = 4, 12, 6
    k = torch.randn(2 * blocks, block_size, 2, 32, generator=g)
    v = torch.randn(2 * blocks, block_size, 2, 32, generator=g)
    table = torch.randperm(2 * blocks, generator=g).view(2, blocks)
    table[1, :5] = table[0, :5]  # a shared prefix (read once for both rows), then blocks of each row's own
    delta = torch.randint(-1000, 1000, (2, blocks), generator=g)
    delta[1, :5] = delta[0, :5]
    lens = torch.full((2, blocks), block_size)
    lens[:, 3] = 1  # an entry cut short by an edit: view positions move
    q = torch.randn(2, 4, q_len, 32, generator=g)
    rope = gc.RopeSpec.from_base(10000.0, 32)
    want = per_query(q, k, v, table, delta, lens, rope, 32**-0.5, True, window)
    for b in range(2):  # poison the entries wholly before the first query's window
        first_seen = int(lens[b].sum()) - q_len - window + 1
        ends = lens[b].cumsum(0)
        for j in range(blocks):
            if ends[j] <= first_seen:
                k[table[b, j]], v[table[b, j]] = float("nan"), float("nan")
    assert torch.isnan(k).any()
    out = gc.rotated_query_attention(q, k, v, table, delta, lens, rope, window=window, impl=impl)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("impl", ["native", "loop", "reference"])
def test_gradcheck_with_a_window(impl, softcap):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 3, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 3, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    table, lens = torch.tensor([[2, 0, 3]]), torch.tensor([[3, 2, 3]])
    delta = torch.tensor([[0.5, -3.25, 7.0]], dtype=torch.float64, requires_grad=True)
    rope = gc.RopeSpec.from_base(10000.0, 8)

    def f(q, k, v, delta):
        return gc.rotated_query_attention(q, k, v, table, delta, lens, rope, window=4, softcap=softcap, impl=impl,
                                          return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v, delta), eps=2.0**-20, atol=1e-6)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("window", -1, "window: expected an int >= 0"), ("window", 2.5, "window: expected an int >= 0"),
    ("window", True, "window: expected an int >= 0"), ("softcap", -1.0, "softcap: expected a finite number >= 0"),
    ("softcap", float("inf"), "softcap: expected a finite number >= 0"),
    ("softcap", float("nan"), "softcap: expected a finite number >= 0")])
def test_a_bad_variant_is_named(name, value, message):
    q, k = torch.randn(1, 1, 1, 8), torch.randn(2, 4, 1, 8)
    with pytest.raises(ValueError, match=message):
        gc.rotated_query_attention(q, k, k, torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[4]]),
                                   gc.RopeSpec.from_base(10000.0, 8), **{name: value})
