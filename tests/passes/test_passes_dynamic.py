"""Dynamic shapes: attention over `materialize_kv` with a symbolic view length, batch and query length
(torch.compile(dynamic=True)) is rewritten, and a mask that only looks causal at the traced sizes is not."""

import functools

import pytest
import torch

import gaugecompile
from gaugecompile import RopeSpec
from gaugecompile.backend import gauge_backend

H, HKV, D, HIDDEN = 4, 2, 16, 32
ROPE = RopeSpec.from_base(10000.0, D)


def _inputs(batch, q_len, seed):
    g = torch.Generator().manual_seed(seed)
    kp, vp = torch.randn(12, 4, HKV, D, generator=g), torch.randn(12, 4, HKV, D, generator=g)
    table = torch.randint(0, 12, (batch, 3), generator=g)
    delta = torch.randint(-50, 50, (batch, 3), generator=g)
    x = torch.randn(batch, q_len, HIDDEN, generator=g)
    return x, kp, vp, table, delta


WQ = torch.randn(HIDDEN, H * D, generator=torch.Generator().manual_seed(7)) / 6


def _attend(x, kp, vp, table, delta, length, window=None):
    """Project queries, materialise the view, attend: no mask for one query, kv <= q + offset otherwise."""
    b, s, _ = x.shape
    q = (x @ WQ).view(b, s, H, D).transpose(1, 2)
    k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, length)
    mask = None
    if s > 1:
        q_idx, kv_idx = torch.arange(length - s, length), torch.arange(length)
        mask = kv_idx[None, :] <= q_idx[:, None]
        if window is not None:
            mask = mask & (kv_idx[None, :] > q_idx[:, None] - window)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _compile(fn, inner):
    sink = []
    torch._dynamo.reset()
    backend = functools.partial(gauge_backend, inner=inner, report_sink=sink)
    return torch.compile(fn, backend=backend, dynamic=True), sink


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_symbolic_length_decode_and_prefill_rewritten(inner):
    compiled, sink = _compile(_attend, inner)
    # decode (q_len 1), then prefill chunks; lengths and batch change without changing the graph's structure
    cases = [(2, 1, 9), (3, 1, 11), (2, 3, 10), (3, 4, 12)] if inner == "eager" else [(2, 1, 9), (2, 3, 10)]
    for seed, (batch, q_len, length) in enumerate(cases):
        args = (*_inputs(batch, q_len, seed), length)
        torch.testing.assert_close(compiled(*args), _attend(*args), atol=1e-5, rtol=1e-5)
    rewritten = [s for r, _, _ in sink for s in r.rewritten]
    refused = [s for r, _, _ in sink for s in r.refused]
    assert not refused, [s.describe() for s in refused]
    assert len(rewritten) == len(sink) >= 2  # one site per compiled graph (decode and prefill graphs)
    assert all(s.gather == "materialize_kv" for s in rewritten)


def test_sliding_window_mask_refused_with_dynamic_shapes():
    fn = functools.partial(_attend, window=5)
    compiled, sink = _compile(fn, "eager")
    for seed, (batch, q_len, length) in enumerate([(2, 3, 10), (2, 4, 12)]):
        args = (*_inputs(batch, q_len, seed), length)
        torch.testing.assert_close(compiled(*args), fn(*args), atol=1e-5, rtol=1e-5)
    refused = [s for r, _, _ in sink for s in r.refused]
    assert refused and not [s for r, _, _ in sink for s in r.rewritten]
    assert all("neither all-visible nor the bottom-right causal" in s.reason for s in refused)


@pytest.mark.parametrize("tied", [True, False])
def test_is_causal_needs_equal_lengths(tied):
    """is_causal (top-left) equals the op's bottom-right causal mask only when q_len == kv_len.  Tied (the view
    length is q's own size): proven, rewritten.  Independent sizes equal at the traced call: rewritten under a
    run-time assert, so a later call with other sizes raises instead of computing something else."""

    def fn(q, kp, vp, table, delta, length):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, q.shape[2] if tied else length)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                scale=D**-0.5)

    compiled, sink = _compile(fn, "eager")
    for seed, (q_len, length) in enumerate([(5, 5), (6, 6), (3, 7)]):
        _, kp, vp, table, delta = _inputs(2, q_len, seed)
        q = torch.randn(2, H, q_len, D)
        args = (q, kp, vp, table, delta, length)
        if q_len != length and not tied:
            with pytest.raises(RuntimeError, match="q_len == kv_len"):
                compiled(*args)
        else:
            torch.testing.assert_close(compiled(*args), fn(*args), atol=1e-5, rtol=1e-5)
    rewritten = [s for r, _, _ in sink for s in r.rewritten]
    assert len(rewritten) == 1 and not [s for r, _, _ in sink for s in r.refused]
    assert rewritten[0].assumes == ("" if tied else "q_len == kv_len")


def test_is_causal_over_fresh_concatenation_refused_when_lengths_independent():
    """The run-time assert is only used over materialize_kv; a cat of independent pieces is refused instead."""

    def fn(q, past_k, past_v, k_new, v_new):
        k, v = torch.cat([past_k, k_new], 2), torch.cat([past_v, v_new], 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                scale=D**-0.5)

    compiled, sink = _compile(fn, "eager")
    g = torch.Generator().manual_seed(3)
    for q_len, past in [(5, 2), (6, 3)]:
        q = torch.randn(2, H, q_len, D, generator=g)
        past_k, past_v = (torch.randn(2, HKV, past, D, generator=g) for _ in range(2))
        k_new, v_new = (torch.randn(2, HKV, q_len - past, D, generator=g) for _ in range(2))
        args = (q, past_k, past_v, k_new, v_new)
        torch.testing.assert_close(compiled(*args), fn(*args), atol=1e-5, rtol=1e-5)
    refused = [s for r, _, _ in sink for s in r.refused]
    assert refused and not [s for r, _, _ in sink for s in r.rewritten]
    assert "not provably equal is top-left aligned" in refused[0].reason


def _causal(q_len, length, dtype):
    visible = torch.arange(length)[None, :] <= torch.arange(length - q_len, length)[:, None]
    if dtype == torch.bool:
        return visible
    return torch.zeros(q_len, length).masked_fill(~visible, float("-inf")).to(dtype)


def _attend_masked(q, kp, vp, table, delta, mask):
    k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, mask.shape[-1])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=D**-0.5)


@pytest.mark.parametrize(("inner", "dtype"), [("eager", torch.bool), ("eager", torch.float32),
                                              ("inductor", torch.float32)])
def test_input_mask_over_views_checked_at_run_time(inner, dtype):
    """A mask that is a graph input (transformers builds it in another graph when the cache breaks the graph)
    cannot be proven causal, so over materialize_kv the site becomes `rotated_query_attention_masked`: causal
    masks run the rotated-query op without gathering, and a mask that hides a visible key (padding), shows a
    hidden one (no causality) or carries a bias runs masked attention over the view; all equal eager."""
    from gaugecompile.ops import masked_attention

    compiled, sink = _compile(_attend_masked, inner)
    g = torch.Generator().manual_seed(5)
    gathers = []
    original = masked_attention.materialize_views
    masked_attention.materialize_views = lambda *a: gathers.append(1) or original(*a)
    try:
        for q_len, length in [(3, 9), (1, 10), (4, 12)]:
            _, kp, vp, table, delta = _inputs(2, q_len, q_len)
            q = torch.randn(2, H, q_len, D, generator=g)
            args = (q, kp, vp, table, delta, _causal(q_len, length, dtype))
            torch.testing.assert_close(compiled(*args), _attend_masked(*args), atol=1e-5, rtol=1e-5)
        assert not gathers
        padded, unmasked = _causal(4, 12, dtype).clone(), torch.zeros(4, 12, dtype=dtype)
        padded[:, 0] = False if dtype == torch.bool else float("-inf")
        if dtype == torch.bool:
            unmasked = ~unmasked
        bad = [padded, unmasked] + ([] if dtype == torch.bool else [_causal(4, 12, dtype) + 0.5])
        for mask in bad:
            args = (q, kp, vp, table, delta, mask)
            torch.testing.assert_close(compiled(*args), _attend_masked(*args), atol=1e-5, rtol=1e-5)
        assert len(gathers) == len(bad)
    finally:
        masked_attention.materialize_views = original
    rewritten = [s for r, _, _ in sink for s in r.rewritten]
    assert rewritten and not [s for r, _, _ in sink for s in r.refused]
    assert all(s.assumes.startswith("mask == causal") for s in rewritten)


def test_input_mask_over_concatenation_refused():
    """Without materialize_kv's view (which the masked op can gather as its fallback) an input mask leaves the site
    refused: it computes exactly what it did, and strict=True raises quoting the reason."""

    def fn(q, past_k, past_v, k_new, v_new, mask):
        k, v = torch.cat([past_k, k_new], 2), torch.cat([past_v, v_new], 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    sink = []
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=functools.partial(gauge_backend, inner="eager", report_sink=sink))
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, H, 3, D, generator=g)
    past_k, past_v = (torch.randn(2, HKV, 5, D, generator=g) for _ in range(2))
    k_new, v_new = (torch.randn(2, HKV, 3, D, generator=g) for _ in range(2))
    mask = _causal(3, 8, torch.bool)
    mask[:, 0] = False
    args = (q, past_k, past_v, k_new, v_new, mask)
    torch.testing.assert_close(compiled(*args), fn(*args), atol=1e-5, rtol=1e-5)
    refused = [s for r, _, _ in sink for s in r.refused]
    assert refused and not [s for r, _, _ in sink for s in r.rewritten]
    assert "runtime input" in refused[0].reason
    torch._dynamo.reset()
    strict = torch.compile(fn, backend=functools.partial(gauge_backend, inner="eager", strict=True))
    with pytest.raises(Exception, match="runtime input"):
        strict(*args)


def _eager_chain_repeat_interleave(q, kp, vp, table, delta, length):
    k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, length)
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    return torch.softmax(q @ k.transpose(2, 3) * D**-0.5, -1) @ v


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_eager_chain_with_repeat_interleave_under_dynamic_shapes(inner):
    """GQA by repeat_interleave in an eager chain, compiled with dynamic=True.  With heads from a projection (static)
    the site is rewritten; Inductor hands the softmax over decomposed, with the scale folded into it.  With the head
    count itself symbolic the repeat-kv proof cannot be made, and the report says so instead of dropping the site."""

    def projected(x, kp, vp, table, delta, length):
        b, s, _ = x.shape
        return _eager_chain_repeat_interleave((x @ WQ).view(b, s, H, D).transpose(1, 2), kp, vp, table, delta, length)

    compiled, sink = _compile(projected, inner)
    for seed, (batch, length) in enumerate([(2, 9), (3, 11)]):
        args = (*_inputs(batch, 1, seed), length)
        torch.testing.assert_close(compiled(*args), projected(*args), atol=1e-5, rtol=1e-5)
    assert [len(r.rewritten) for r, _, _ in sink] == [1] * len(sink) and not [s for r, _, _ in sink for s in r.refused]

    compiled, sink = _compile(_eager_chain_repeat_interleave, inner)
    _, kp, vp, table, delta = _inputs(2, 1, 0)
    args = (torch.randn(2, H, 1, D), kp, vp, table, delta, 9)
    torch.testing.assert_close(compiled(*args), _eager_chain_repeat_interleave(*args), atol=1e-5, rtol=1e-5)
    refused = [s for r, _, _ in sink for s in r.refused]
    assert len(refused) == 1 and "head count is dynamic" in refused[0].reason
