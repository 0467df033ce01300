"""Hand-written patterns (not transformers): each is detected, rewritten (or refused) and equals eager."""

import functools

import pytest
import torch
from gaugecompile.passes import GaugeRefusedError, run_passes

import gaugecompile
from gaugecompile import RopeSpec
from gaugecompile.backend import gauge_backend

B, H, HKV, D, L = 2, 4, 2, 16, 12
ROPE = RopeSpec.from_base(10000.0, D)


def _compile(fn, inner="eager", strict=False):
    sink = []
    torch._dynamo.reset()
    backend = functools.partial(gauge_backend, inner=inner, strict=strict, report_sink=sink)
    return torch.compile(fn, backend=backend, dynamic=False), sink


def _sites(sink):
    rewritten = [s for r, _, _ in sink for s in r.rewritten]
    refused = [s for r, _, _ in sink for s in r.refused]
    return rewritten, refused


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, pos, inv_freq):
    """Rotate-half RoPE of x [B, h, n, D] at integer positions pos (broadcastable to [B, n])."""
    ang = pos[..., None].float() * inv_freq
    emb = torch.cat((ang, ang), -1)[:, None]
    return x * emb.cos() + _rotate_half(x) * emb.sin()


def _eager_attention(q, k, v, mask=None):
    k = k[:, :, None].expand(B, HKV, H // HKV, *k.shape[2:]).reshape(B, H, *k.shape[2:])
    v = v[:, :, None].expand(B, HKV, H // HKV, *v.shape[2:]).reshape(B, H, *v.shape[2:])
    w = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
    if mask is not None:
        w = w + mask
    return torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _variant_attention(q, k, v, mask, softcap, sinks):
    """Eager attention in the Gemma 2 (soft-capped scores) and GPT-OSS (a sink logit column, dropped after the
    softmax, the rows centred first) forms."""
    k = k[:, :, None].expand(B, HKV, H // HKV, *k.shape[2:]).reshape(B, H, *k.shape[2:])
    v = v[:, :, None].expand(B, HKV, H // HKV, *v.shape[2:]).reshape(B, H, *v.shape[2:])
    w = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
    if softcap:
        w = torch.tanh(w / softcap) * softcap
    w = w + mask
    if sinks is not None:
        w = torch.cat([w, sinks.reshape(1, -1, 1, 1).expand(B, -1, q.shape[2], -1)], dim=-1)
        w = w - w.max(dim=-1, keepdim=True).values
        return torch.matmul(torch.softmax(w, dim=-1)[..., :-1], v)
    return torch.matmul(torch.softmax(w, dim=-1), v)


@pytest.fixture(scope="module")
def pool():
    g = torch.Generator().manual_seed(0)
    kp, vp = torch.randn(9, 4, HKV, D, generator=g), torch.randn(9, 4, HKV, D, generator=g)
    table = torch.tensor([[3, 0, 7], [5, 8, 1]])
    delta = torch.tensor([[0, -9, 40], [2, 2, 100]])
    return kp, vp, table, delta


@pytest.mark.parametrize("form", ["sdpa", "eager"])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_materialize_site_rewritten(pool, form, inner):
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 1, D)

    def f(q, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        if form == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return _eager_attention(q, k, v)

    compiled, sink = _compile(f, inner)
    torch.testing.assert_close(compiled(q, kp, vp, table, delta), f(q, kp, vp, table, delta), atol=1e-4, rtol=1e-4)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused
    assert rewritten[0].gather == "materialize_kv"


def test_prefill_over_materialized_past_with_causal_mask(pool):
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 3, D)

    def f(q, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        mask = torch.full((3, L), float("-inf")).triu(L - 3 + 1)
        return _eager_attention(q, k, v, mask)

    compiled, sink = _compile(f)
    torch.testing.assert_close(compiled(q, kp, vp, table, delta), f(q, kp, vp, table, delta), atol=1e-4, rtol=1e-4)
    assert len(_sites(sink)[0]) == 1


@pytest.mark.parametrize(("softcap", "with_sinks"), [(2.0, False), (0.0, True), (1.5, True)])
def test_soft_capped_and_sink_attention_rewritten(pool, softcap, with_sinks):
    """The variants over a mask proven causal at compile time: the op's softcap, and its log-sum-exp turning the
    sink into a factor sigmoid(lse - sink) per row."""
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 3, D)
    sinks = torch.randn(H) * 2 if with_sinks else None

    def f(q, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        mask = torch.full((3, L), float("-inf")).triu(L - 3 + 1)
        return _variant_attention(q, k, v, mask, softcap, sinks)

    compiled, sink = _compile(f)
    torch.testing.assert_close(compiled(q, kp, vp, table, delta), f(q, kp, vp, table, delta), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused


@pytest.mark.parametrize("masked", [False, True])
def test_sliced_view_rewritten_with_a_window(pool, masked):
    """A sliding layer's view: materialize_kv, the last W keys sliced, SDPA.  With no mask (one query: it sees the
    whole slice) the op gets the slice's length as its window; with a mask input the masked op reads the window
    from it at run time."""
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 1, D)
    window = 5

    def f(q, kp, vp, table, delta, mask):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        k, v = k[:, :, L - window:], v[:, :, L - window:]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    mask = torch.zeros(B, 1, 1, window) if masked else None
    compiled, sink = _compile(f)
    got = compiled(q, kp, vp, table, delta, mask)
    torch.testing.assert_close(got, f(q, kp, vp, table, delta, mask), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused
    assert rewritten[0].gather == "materialize_kv+window-slice"


@pytest.mark.parametrize("returned", [False, True])
def test_view_read_by_two_layers_rewritten_in_both(pool, returned):
    """KV sharing (Gemma 3n): a second layer attends over the first layer's view with its own queries.  Both sites
    become the op and the gather goes; a view also returned (as a new cache would be) stays, so neither is made."""
    kp, vp, table, delta = pool
    q1, q2 = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)

    def f(q1, q2, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        a = torch.nn.functional.scaled_dot_product_attention(q1, k, v, enable_gqa=True)
        b = _eager_attention(q2, k, v)
        return (a, b, k) if returned else (a, b)

    sink: list = []
    torch._dynamo.reset()
    backend = functools.partial(gauge_backend, inner="eager", report_sink=sink, keep_graphs=True)
    compiled = torch.compile(f, backend=backend, dynamic=False)
    for got, want in zip(compiled(q1, q2, kp, vp, table, delta), f(q1, q2, kp, vp, table, delta), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    after = sink[0][2]
    if returned:
        assert not rewritten and len(refused) == 2
        assert all("also used elsewhere" in s.reason for s in refused)
    else:
        assert len(rewritten) == 2 and not refused
        assert "materialize_kv" not in after and after.count("gauge.rotated_query_attention") == 2


@pytest.mark.parametrize("mask_input", [False, True])
def test_post_attention_sink_scaling_reads_the_ops_lse(pool, mask_input):
    """Granite's sinks: `sigmoid(logsumexp(scores + mask) - sink)` scales the attention output; the model's
    logsumexp of the scores becomes the op's log-sum-exp (from the masked op too, where the mask is an input)."""
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 3, D)
    sinks = torch.randn(H)
    causal = torch.full((3, L), float("-inf")).triu(L - 3 + 1)

    def f(q, kp, vp, table, delta, mask):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        k = k[:, :, None].expand(B, HKV, H // HKV, L, D).reshape(B, H, L, D)
        v = v[:, :, None].expand(B, HKV, H // HKV, L, D).reshape(B, H, L, D)
        w = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + (causal if mask is None else mask)
        scale = (torch.logsumexp(w, dim=-1) - sinks.view(1, -1, 1)).sigmoid()
        return torch.matmul(torch.softmax(w, dim=-1), v) * scale.unsqueeze(-1)

    mask = causal[None, None].expand(B, 1, 3, L).clone() if mask_input else None
    compiled, sink = _compile(f)
    torch.testing.assert_close(compiled(q, kp, vp, table, delta, mask), f(q, kp, vp, table, delta, mask),
                               atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused


@pytest.mark.parametrize("form", ["sdpa", "eager"])
def test_gqa_by_repeat_rewritten_with_the_heads_regrouped(pool, form):
    """JetMoE repeats the KV heads with `repeat` (tiled: query head h reads KV head h % HKV), not repeat-kv's
    interleave: the rewrite regroups the query heads for the op and the output back."""
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 1, D)

    def f(q, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        k, v = k.repeat(1, H // HKV, 1, 1), v.repeat(1, H // HKV, 1, 1)
        if form == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * D**-0.5, dim=-1), v)

    compiled, sink = _compile(f)
    torch.testing.assert_close(compiled(q, kp, vp, table, delta), f(q, kp, vp, table, delta), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused


@pytest.mark.parametrize("form", ["sdpa-bool-mask", "prescaled"])
def test_multi_query_attention_by_broadcast_with_prescaled_operands_rewritten(form):
    """Falcon's multi-query SDPA: one KV head broadcast over the query heads and a boolean mask, which torch
    decomposes into q and k each scaled by sqrt(scale), an `expand` of the head and `_safe_softmax`."""
    g = torch.Generator().manual_seed(1)
    kp, vp = torch.randn(9, 4, 1, D, generator=g), torch.randn(9, 4, 1, D, generator=g)
    table, delta = torch.tensor([[3, 0, 7], [5, 8, 1]]), torch.tensor([[0, -9, 40], [2, 2, 100]])
    q = torch.randn(B, H, 1, D)
    visible = torch.ones(1, 1, 1, L, dtype=torch.bool)

    def f(q, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        if form == "sdpa-bool-mask":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        root = D**-0.25  # the scale split between the two operands
        w = torch.matmul(q * root, (k * root).expand(B, H, L, D).transpose(2, 3))
        return torch.matmul(torch.softmax(w, dim=-1), v.expand(B, H, L, D))

    compiled, sink = _compile(f)
    torch.testing.assert_close(compiled(q, kp, vp, table, delta), f(q, kp, vp, table, delta), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused


def test_scores_through_baddbmm_over_zeros_rewritten(pool):
    """GPT-NeoX-Japanese: scores = baddbmm(zeros, q, k^T, beta=1, alpha=1/sqrt(D)), which is alpha * q k^T."""
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 1, D)

    def f(q, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        k = k.repeat_interleave(H // HKV, dim=1).reshape(B * H, L, D)
        v = v.repeat_interleave(H // HKV, dim=1)
        zeros = torch.zeros(B * H, 1, L)
        w = torch.baddbmm(zeros, q.reshape(B * H, 1, D), k.transpose(1, 2), beta=1.0, alpha=D**-0.5)
        return torch.matmul(torch.softmax(w.view(B, H, 1, L), dim=-1), v)

    compiled, sink = _compile(f)
    torch.testing.assert_close(compiled(q, kp, vp, table, delta), f(q, kp, vp, table, delta), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused


class BeamReorder(torch.nn.Module):
    """Reorders its past cache by beam index inside forward, then attends over past + new tokens."""

    def forward(self, q, k_new, v_new, past_k, past_v, beam_idx):
        k = torch.cat([past_k.index_select(0, beam_idx), k_new], dim=2)
        v = torch.cat([past_v.index_select(0, beam_idx), v_new], dim=2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class StreamingLLM(torch.nn.Module):
    """Keeps `sinks` tokens, re-rotates the rest of its window back by `shift` every step (StreamingLLM)."""

    def __init__(self, sinks=2):
        super().__init__()
        self.sinks = sinks
        self.register_buffer("inv_freq", ROPE.inv_freq.float(), persistent=False)

    def forward(self, q, k_new, v_new, past_k, past_v, shift):
        window = _rope(past_k[:, :, self.sinks:], -shift[:, None], self.inv_freq)
        k = torch.cat([past_k[:, :, : self.sinks], window, k_new], dim=2)
        v = torch.cat([past_v[:, :, : self.sinks], past_v[:, :, self.sinks:], v_new], dim=2)
        return _eager_attention(q, k, v)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("model_cls", [BeamReorder, StreamingLLM])
def test_cache_reorganisation_rewritten(model_cls, inner):
    g = torch.Generator().manual_seed(1)
    q, k_new, v_new = (torch.randn(B, s, 1, D, generator=g) for s in (H, HKV, HKV))
    past_k, past_v = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    extra = torch.tensor([1, 0]) if model_cls is BeamReorder else torch.tensor([3, 17])
    model = model_cls()
    compiled, sink = _compile(model, inner)
    for step in range(2):  # every step re-rotates / reorders again
        args = (q + step, k_new, v_new, past_k, past_v, extra)
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-4, rtol=1e-4)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused, refused
    kind = "index_select" if model_cls is BeamReorder else "rerotation"
    assert kind in rewritten[0].gather
    assert rewritten[0].pieces == (2 if model_cls is BeamReorder else 3)


def test_input_padding_mask_runs_the_masked_op_and_keeps_results(pool):
    """A padding mask that arrives as an input is only known at run time: the site becomes the masked op,
    whose run-time check sees that the mask is not causal and attends over the gathered view with it."""
    kp, vp, table, delta = pool
    q = torch.randn(B, H, 1, D)

    def f(q, kp, vp, table, delta, pad):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        return _eager_attention(q, k, v, pad)

    pad = torch.zeros(B, 1, 1, L)
    pad[0, ..., :3] = float("-inf")
    for inner in ("eager", "inductor"):
        compiled, sink = _compile(f, inner=inner, strict=True)  # nothing refused: strict does not raise
        torch.testing.assert_close(compiled(q, kp, vp, table, delta, pad), f(q, kp, vp, table, delta, pad))
        none = torch.zeros_like(pad)  # all visible: the causal mask of one query
        torch.testing.assert_close(compiled(q, kp, vp, table, delta, none), f(q, kp, vp, table, delta, none))
        rewritten, refused = _sites(sink)
        assert len(rewritten) == 1 and not refused
        assert rewritten[0].assumes.startswith("mask == causal")
    assert issubclass(GaugeRefusedError, RuntimeError)


@pytest.mark.parametrize("mask_shape", [(L,), (3, L)])
def test_unexpected_mask_shape_refused_with_reason(pool, mask_shape):
    """A mask sdpa would reject (1-D) or that does not broadcast to the scores is a refusal, not a crash."""
    kp, vp, table, delta = pool

    class Site(torch.nn.Module):
        def forward(self, q, kp, vp, table, delta, mask):
            k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    gm = torch.export.export(Site(), (torch.randn(B, H, 1, D), kp, vp, table, delta, torch.ones(1, L))).graph_module
    mask = next(n for n in gm.graph.nodes if n.name == "mask")
    with torch._subclasses.FakeTensorMode():
        mask.meta["val"] = torch.empty(mask_shape)  # the structure a hand-built graph could have
    report = run_passes(gm)
    assert not report.rewritten and len(report.refused) == 1
    assert "attention mask" in report.refused[0].reason and str(list(mask_shape)) in report.refused[0].reason


def test_explain_lists_kernel_sources(pool):
    """explain() derives the Triton specialisation of each rewritten call and includes its generated source."""
    kp, vp, table, delta = pool

    def f(q, kp, vp, table, delta):
        k, v = gaugecompile.materialize_kv(kp, vp, table, delta, ROPE, L)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    report = gaugecompile.explain(f, torch.randn(B, H, 1, D), kp, vp, table, delta, inner="eager")
    assert len(report.rewritten) == 1 and report.kernel_specs and report.kernel_sources
    key = report.kernel_specs[0]
    assert key.startswith(f"d{D}_r{D}_rh_bs4_g{H // HKV}_f32_decode")
    assert key in report.kernel_sources[0] and "@triton.jit" in report.kernel_sources[0]
    assert key in str(report) and key in report.to_markdown()
