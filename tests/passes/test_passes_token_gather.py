"""Hand-written StreamingLLM in the original Llama code's layout: the cache is [batch, len, kv_heads, dim], the
tokens a window keeps are gathered by a token index and re-rotated in complex form (`view_as_complex(k) *
freqs_cis`) with one shift per token, then transposed for the attention.  The rewrite reads the cache in place as
blocks of one token, each with its token's shift; here it is checked against eager, against an independent
float64 reference, and refused (left as it was) where the pattern is not what it seems."""

import functools
import math

import pytest
import torch
from gaugecompile.passes import run_passes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gaugecompile.backend import gauge_backend
from gaugecompile.onnx.decompositions import DECOMPOSITIONS

H, HKV, D = 4, 2, 16
INV_FREQ = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def _polar(shift: torch.Tensor) -> torch.Tensor:
    """freqs_cis of the original Llama code, one row per shift: polar(1, shift * inv_freq) [n, D/2]."""
    angles = torch.outer(shift.float(), INV_FREQ.float())
    return torch.polar(torch.ones_like(angles), angles)


def _rerotate(k: torch.Tensor, shift: torch.Tensor, scramble: bool = False, token_dim: int = 1) -> torch.Tensor:
    """k [B, n, h, D] (or [B, h, n, D] with `token_dim` 2) times freqs_cis of each token's shift (`scramble`: the
    angles laid out wrongly)."""
    freqs = _polar(shift)
    if scramble:
        freqs = freqs.reshape(freqs.shape[1], freqs.shape[0]).t()
    kc = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    freqs = freqs[None, :, None, :] if token_dim == 1 else freqs[None, None]
    return torch.view_as_real(kc * freqs).flatten(3).type_as(k)


class StreamingComplex(torch.nn.Module):
    """Keeps the cached tokens `keep` (sinks and a recent window), each moved by its `shift`, then the new token."""

    def __init__(self, indexing: str = "index_select", scramble: bool = False, head_major: bool = False,
                 sdpa: bool = False):
        super().__init__()
        self.indexing, self.scramble, self.head_major, self.sdpa = indexing, scramble, head_major, sdpa

    def _gather(self, cache: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return cache.index_select(1, keep) if self.indexing == "index_select" else cache[:, keep]

    def forward(self, xq, xk, xv, cache_k, cache_v, keep, shift):
        if self.head_major:  # transformers' layout: a [B, h, len, D] cache, gathered and rotated so
            keys = torch.cat([_rerotate(cache_k.index_select(2, keep), shift, token_dim=2), xk.transpose(1, 2)], 2)
            values = torch.cat([cache_v.index_select(2, keep), xv.transpose(1, 2)], 2)
        else:
            keys = torch.cat([_rerotate(self._gather(cache_k, keep), shift, self.scramble), xk], 1).transpose(1, 2)
            values = torch.cat([self._gather(cache_v, keep), xv], 1).transpose(1, 2)
        if self.sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(xq.transpose(1, 2), keys, values, enable_gqa=True)
            return out.transpose(1, 2)
        keys, values = (t.repeat_interleave(H // HKV, dim=1) for t in (keys, values))
        scores = xq.transpose(1, 2) @ keys.transpose(2, 3) / math.sqrt(D)
        probs = torch.softmax(scores.float(), dim=-1).to(xq.dtype)
        return (probs @ values).transpose(1, 2)


def _reference(xq, xk, xv, cache_k, cache_v, keep, shift) -> torch.Tensor:
    """Gather, re-rotate with explicit cos/sin of interleaved pairs, plain softmax attention, all in float64."""
    k, v = cache_k.double()[:, keep], cache_v.double()[:, keep]
    ang = shift.double()[:, None] * INV_FREQ.float().double()  # [n, D/2]: the model's float32 basis, exact angles
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    even, odd = k[..., 0::2], k[..., 1::2]
    k = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)
    keys = torch.cat([k, xk.double()], 1).repeat_interleave(H // HKV, dim=2)
    values = torch.cat([v, xv.double()], 1).repeat_interleave(H // HKV, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", xq.double(), keys) / math.sqrt(D)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), values)


def _compile(model, inner="eager"):
    sink = []
    torch._dynamo.reset()
    backend = functools.partial(gauge_backend, inner=inner, report_sink=sink)
    return torch.compile(model, backend=backend, dynamic=False), sink


def _inputs(batch=2, cached=20, seed=0, dtype=torch.float32, head_major=False):
    g = torch.Generator().manual_seed(seed)
    new = [torch.randn(batch, 1, h, D, generator=g).to(dtype) for h in (H, HKV, HKV)]
    cache = [torch.randn(batch, cached, HKV, D, generator=g).to(dtype) for _ in range(2)]
    if head_major:
        cache = [c.transpose(1, 2).contiguous() for c in cache]
    return (*new, *cache)


def _sites(sink):
    return ([s for r, _, _ in sink for s in r.rewritten], [s for r, _, _ in sink for s in r.refused])


@pytest.mark.parametrize("indexing", ["index_select", "advanced"])
@pytest.mark.parametrize(("inner", "dtype"), [("eager", torch.float32), ("inductor", torch.float32),
                                              ("eager", torch.bfloat16)])
def test_complex_per_token_rerotation_rewritten(indexing, inner, dtype):
    model = StreamingComplex(indexing)
    compiled, sink = _compile(model, inner)
    args = _inputs(dtype=dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    # two sinks and a window moved back to sit right after them; then the window slides on (same shapes)
    for keep, shift in ((torch.tensor([0, 1, 9, 10, 11, 12]), torch.tensor([0, 0, -7, -7, -7, -7])),
                        (torch.tensor([0, 1, 12, 13, 14, 15]), torch.tensor([0, 0, -10, -10, -10, -10]))):
        torch.testing.assert_close(compiled(*args, keep, shift), model(*args, keep, shift), **tol)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused, refused
    assert "rerotation(complex, per token)" in rewritten[0].gather and "index_select(tokens)" in rewritten[0].gather
    # the cache is read in place as blocks of one token: [batch * len, 1, kv_heads, dim]
    assert rewritten[0].kernels[0][1] == (2 * 20, 1, HKV, D)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), cached=st.integers(1, 24), data=st.data())
def test_rewrite_matches_a_float64_reference(batch, cached, data):
    """Any token index (repeats and any order included) and any shifts up to 2^20, float64 end to end."""
    n = data.draw(st.integers(1, 12))
    keep = torch.tensor(data.draw(st.lists(st.integers(0, cached - 1), min_size=n, max_size=n)))
    shift = torch.tensor(data.draw(st.lists(st.integers(-(2**20), 2**20), min_size=n, max_size=n)))
    args = _inputs(batch, cached, seed=n, dtype=torch.float64)
    compiled, sink = _compile(StreamingComplex())
    got = compiled(*args, keep, shift)
    assert len(_sites(sink)[0]) == 1
    torch.testing.assert_close(got, _reference(*args, keep, shift).to(got.dtype), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(("bad", "inner"), [(-1, "eager"), (20, "eager"), (20, "inductor")])
def test_token_index_out_of_range_raises_naming_it(bad, inner):
    """index_select raises on an index outside the cache; the rewrite checks it too (past a row's end the table
    would read the next row's tokens) and says which index and range."""
    compiled, sink = _compile(StreamingComplex(), inner)
    args = _inputs()
    compiled(*args, torch.tensor([0, 3]), torch.tensor([0, 2]))
    assert len(_sites(sink)[0]) == 1
    where = r"the token index of the cache gather at .*test_passes_token_gather.py, line \d+, in _gather"
    with pytest.raises(RuntimeError, match=where + r" is out of range \[0, 20\)"):
        compiled(*args, torch.tensor([0, bad]), torch.tensor([0, 2]))


def test_scrambled_angles_refused_and_left_as_they_were():
    """freqs_cis laid out so that a token does not get its own shift: the probe of the angle chain says so and the
    site keeps the model's computation."""
    model = StreamingComplex(scramble=True)
    compiled, sink = _compile(model)
    args = (*_inputs(), torch.tensor([0, 1, 9, 10]), torch.tensor([0, 0, -7, -7]))
    torch.testing.assert_close(compiled(*args), model(*args))
    rewritten, refused = _sites(sink)
    assert not rewritten and len(refused) == 1
    assert "not positions[token] * inv_freq" in refused[0].reason


@pytest.mark.parametrize("batch", [1, 2])
def test_head_major_cache_read_in_place_only_where_it_is_blocks_of_one_token(batch):
    """A [batch, heads, len, dim] cache is blocks of one token without a copy only when batch is 1: there the gather
    and the re-rotation go; with more rows they stay in the graph and the op reads their result."""
    model = StreamingComplex(head_major=True)
    compiled, sink = _compile(model)
    args = (*_inputs(batch, head_major=True), torch.tensor([0, 1, 9, 10]), torch.tensor([0, 0, -7, -7]))
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused
    in_place = "rerotation(complex, per token)" in rewritten[0].gather
    assert in_place == (batch == 1), rewritten[0].gather


class BeamThenWindow(StreamingComplex):
    """Beam rows reordered, then the window's tokens kept and shifted: one table of row * len + token."""

    def forward(self, xq, xk, xv, cache_k, cache_v, keep, shift, beams):
        return super().forward(xq, xk, xv, cache_k.index_select(0, beams), cache_v.index_select(0, beams), keep,
                               shift)


def test_row_table_and_token_index_compose():
    model = BeamThenWindow()
    compiled, sink = _compile(model)
    args = (*_inputs(3), torch.tensor([0, 5, 6, 7]), torch.tensor([0, -3, -3, -3]), torch.tensor([2, 2, 0]))
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    rewritten, refused = _sites(sink)
    assert len(rewritten) == 1 and not refused, refused
    assert "index_select" in rewritten[0].gather.split("+")


def test_without_run_time_checks_the_site_is_refused():
    """ONNX export runs the passes without run-time checks (the file cannot raise): the token index's range check
    could not be kept, so the site stays as it was, with the reason."""
    args = (*_inputs(), torch.tensor([0, 1, 9]), torch.tensor([0, 0, -7]))
    exported = torch.export.export(StreamingComplex(sdpa=True), args).run_decompositions(DECOMPOSITIONS)
    report = run_passes(exported.graph_module, run_time_masks=False)
    assert not report.rewritten and len(report.refused) == 1
    assert "token index need a run-time range check" in report.refused[0].reason
