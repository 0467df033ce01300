"""RoPE kinds the detector names (one traced pattern each), a complex-multiplication RoPE model over a reordered
cache, a dynamic inv_freq (refused), and a static cache written with index_copy_."""

import functools

import pytest
import torch
from gaugecompile.passes import match_rope

from gaugecompile import RopeSpec
from gaugecompile.backend import gauge_backend

B, H, HKV, D, L = 2, 4, 2, 16, 10
ROPE = RopeSpec.from_base(10000.0, D)
INV_FREQ = ROPE.inv_freq.float()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _angles(pos, inv_freq):
    return pos[..., None].float() * inv_freq  # [B, n, F]


def _rope_half(x, pos, inv_freq):
    ang = _angles(pos, inv_freq)
    emb = torch.cat((ang, ang), -1)[:, None]
    return x * emb.cos() + _rotate_half(x) * emb.sin()


def _rope_interleaved(x, pos, inv_freq):
    ang = _angles(pos, inv_freq)[:, None]
    cos, sin = (torch.stack((t, t), -1).flatten(-2) for t in (ang.cos(), ang.sin()))
    return x * cos + _rotate_every_two(x) * sin


def _rope_complex(x, pos, inv_freq):
    """The original Llama reference: x [B, n, h, D] times freqs_cis = polar(1, outer(t, inv_freq))."""
    freqs_cis = torch.polar(torch.ones(pos.shape[-1], inv_freq.shape[0]), torch.outer(pos[0].float(), inv_freq))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def _rope_partial(x, pos, inv_freq):
    rot = 2 * inv_freq.shape[0]
    return torch.cat((_rope_half(x[..., :rot], pos, inv_freq), x[..., rot:]), dim=-1)


def _rope_table(x, pos, table):
    cos, sin = table[0][pos][:, None], table[1][pos][:, None]
    return x * cos + _rotate_half(x) * sin


def _dynamic_inv_freq(n):
    """Dynamic-NTK style: the base grows with the sequence length, so inv_freq is computed per call."""
    base = 10000.0 * (n / 4) ** (D / (D - 2))
    return 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def _cases():
    pos = torch.arange(L)[None].expand(B, L)
    x = torch.randn(B, H, L, D)
    table = torch.stack([torch.cat((a, a), -1) for a in (_angles(torch.arange(64), INV_FREQ).cos(),
                                                           _angles(torch.arange(64), INV_FREQ).sin())])
    return {
        "rotate-half": (lambda x, p: _rope_half(x, p, INV_FREQ), x, "inv_freq", D),
        "interleaved": (lambda x, p: _rope_interleaved(x, p, INV_FREQ), x, None, D),
        "complex": (lambda x, p: _rope_complex(x, p, INV_FREQ), x.transpose(1, 2), "inv_freq", D),
        "rotate-half+partial": (lambda x, p: _rope_partial(x, p, INV_FREQ[:4]), x, "inv_freq", 8),
        "table": (lambda x, p: _rope_table(x, p, table), x, "table", D),
        "dynamic": (lambda x, p: _rope_half(x, p, _dynamic_inv_freq(x.shape[2])), x, "dynamic", D),
    }, pos


@pytest.mark.parametrize("name", ["rotate-half", "interleaved", "complex", "rotate-half+partial", "table", "dynamic"])
def test_rope_kind_detected(name):
    cases, pos = _cases()
    fn, x, angle, rot = cases[name]
    class Two(torch.nn.Module):
        def forward(self, x, p):
            return fn(x, p), fn(x + 1, p)

    gm = torch.export.export(Two(), (x, pos)).graph_module
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    matches = [match_rope(o) for o in outs]
    assert all(m is not None for m in matches) and len(matches) == 2  # count: both applications found
    kind = {"table": "rotate-half", "dynamic": "rotate-half"}.get(name, name)
    assert {m.kind for m in matches} == {kind}
    assert matches[0].rotary_dim == rot and matches[0].interleaved == (name in ("interleaved", "complex"))
    if angle is not None:
        assert matches[0].angle().kind == angle
    if name not in ("complex", "dynamic"):  # the same rotation as gaugecompile's RoPE at those positions
        spec = RopeSpec(ROPE.inv_freq[: rot // 2], rotary_dim=rot, interleaved=name == "interleaved")
        torch.testing.assert_close(fn(x, pos), spec.apply(x, pos[:, None].expand(B, H, L)).float(),
                                   atol=1e-4, rtol=1e-4)


def _compile(fn):
    sink = []
    torch._dynamo.reset()
    return torch.compile(fn, backend=functools.partial(gauge_backend, inner="eager", report_sink=sink),
                         dynamic=False), sink


def _sites(sink):
    return [s for r, _, _ in sink for s in r.rewritten], [s for r, _, _ in sink for s in r.refused]


class ComplexRopeBeam(torch.nn.Module):
    """Llama-reference attention: complex RoPE on [B, n, h, D], a past cache reordered by beam index."""

    def forward(self, xq, xk, xv, past_k, past_v, beam_idx, pos):
        xq, xk = _rope_complex(xq, pos, INV_FREQ), _rope_complex(xk, pos, INV_FREQ)
        k = torch.cat([past_k.index_select(0, beam_idx), xk.transpose(1, 2)], dim=2)
        v = torch.cat([past_v.index_select(0, beam_idx), xv.transpose(1, 2)], dim=2)
        k, v = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
        scores = torch.matmul(xq.transpose(1, 2), k.transpose(2, 3)) / D**0.5
        return torch.matmul(torch.softmax(scores.float(), dim=-1).type_as(xq), v)


class DynamicRerotation(torch.nn.Module):
    """Re-rotates its cached keys with an inv_freq that depends on the sequence length (dynamic NTK)."""

    def forward(self, q, k_new, v_new, past_k, past_v, shift):
        inv_freq = _dynamic_inv_freq(past_k.shape[2] + 1)
        k = torch.cat([_rope_half(past_k, -shift[:, None], inv_freq), k_new], dim=2)
        v = torch.cat([past_v, v_new], dim=2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_complex_rope_model_over_reordered_cache_rewritten():
    g = torch.Generator().manual_seed(2)
    xq, xk, xv = (torch.randn(B, 1, h, D, generator=g) for h in (H, HKV, HKV))
    past_k, past_v = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    args = (xq, xk, xv, past_k, past_v, torch.tensor([1, 1]), torch.tensor([[L]]))
    model = ComplexRopeBeam()
    compiled, sink = _compile(model)
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused, [s.describe() for s in refused]
    assert rewritten[0].rope == "complex" and "index_select" in rewritten[0].gather


def test_dynamic_inv_freq_rerotation_refused():
    g = torch.Generator().manual_seed(3)
    q, k_new, v_new = (torch.randn(B, h, 1, D, generator=g) for h in (H, HKV, HKV))
    past_k, past_v = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    args = (q, k_new, v_new, past_k, past_v, torch.tensor([2, 5]))
    model = DynamicRerotation()
    compiled, sink = _compile(model)
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert not rewritten and len(refused) == 1
    assert "dynamic inv_freq (it depends on the sequence length)" in refused[0].reason


class StaticCacheAttention(torch.nn.Module):
    """transformers' StaticCache: index_copy_ new K/V into [B, Hkv, Lmax, D] buffers, attend over the buffers
    (unwritten slots hidden by a mask built from cache_position, or no mask once the cache is full)."""

    def __init__(self, masked: bool):
        super().__init__()
        self.masked = masked
        self.register_buffer("k_cache", torch.randn(B, HKV, L, D, generator=torch.Generator().manual_seed(4)))
        self.register_buffer("v_cache", torch.randn(B, HKV, L, D, generator=torch.Generator().manual_seed(5)))

    def forward(self, q, k_new, v_new, cache_position):
        self.k_cache.index_copy_(2, cache_position, k_new)
        self.v_cache.index_copy_(2, cache_position, v_new)
        mask = None
        if self.masked:
            mask = torch.arange(L)[None, :] <= cache_position[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask,
                                                                enable_gqa=True)


@pytest.mark.parametrize("masked", [False, True])
def test_static_cache_index_copy(masked):
    g = torch.Generator().manual_seed(6)
    q, k_new, v_new = (torch.randn(B, h, 1, D, generator=g) for h in (H, HKV, HKV))
    args = (q, k_new, v_new, torch.tensor([L - 3 if masked else L - 1]))
    eager, model = StaticCacheAttention(masked), StaticCacheAttention(masked)
    compiled, sink = _compile(model)
    torch.testing.assert_close(compiled(*args), eager(*args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.k_cache, eager.k_cache)  # the write still happens
    rewritten, refused = _sites(sink)
    sites = rewritten + refused
    assert len(sites) == 1 and sites[0].gather == "static-cache(index_copy)"
    if masked:  # the mask reads cache_position at run time: not provable, left as it was
        assert not rewritten and "runtime input" in refused[0].reason
    else:
        assert rewritten and not refused
