"""The generated native CPU kernels against their float64 references: attention and materialize_kv."""

import warnings

import pytest
import torch
from gaugecompile.codegen import KernelSpec, native
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode  # torch internal: it has no public alias

import gaugecompile as gc
from gaugecompile.block_tables import full_block_lens
from gaugecompile.ops.materialize import materialize_views
from gaugecompile.rope import MAX_ABS_DELTA

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_native_kernel_builds_here():
    """CI builds and runs the native path: a compiler and ninja are part of the install."""
    assert native.native_available()
    spec = KernelSpec(40, 20, True, 4, 2, "float32")
    lib = native.native_library(spec)
    assert hasattr(lib, "attention") and hasattr(lib, "materialize")
    assert "head_dim 40" in native.native_source(spec) and "#define GAUGE_HEAD_DIM 40\n" in native.native_source(spec)


@st.composite
def native_cases(draw):
    group = draw(st.sampled_from([1, 3, 4]))
    kv_heads = draw(st.sampled_from([1, 2, 3, 12]))  # 12 x 64 dims: K/V rows wide enough for chunks under 64 tokens
    head_dim = draw(st.sampled_from([12, 40, 64]))  # 12: no full 8-lane vector; 40: one tail after 32
    rotary_dim = draw(st.sampled_from([head_dim, head_dim // 2 - (head_dim // 2) % 2 or 2]))
    block_size = draw(st.sampled_from([1, 2, 7, 16, 100, 256]))
    q_len = draw(st.sampled_from([1, 1, 2, 9]))
    blocks = draw(st.integers(-(-q_len // block_size), max(-(-q_len // block_size), min(10, 600 // block_size))))
    batch = draw(st.integers(1, 4))
    return dict(group=group, kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim, block_size=block_size,
                blocks=blocks, batch=batch, q_len=q_len, interleaved=draw(st.booleans()), causal=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])),
                shared=draw(st.integers(0, blocks)), equal_lengths=draw(st.booleans()), ragged=draw(st.booleans()),
                head_stride=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


def make(c):
    """Random pools, tables with a shared prefix of `shared` blocks, deltas up to the documented bound; tokens per
    entry either a plain paged layout or `ragged`."""
    g = torch.Generator().manual_seed(c["seed"])
    heads, bs, blocks = c["kv_heads"] * c["group"], c["block_size"], c["blocks"]
    pool_blocks = blocks + 3
    q = torch.randn(c["batch"], heads, c["q_len"], c["head_dim"], generator=g, dtype=torch.float64)
    kv_heads = c["kv_heads"] * (2 if c["head_stride"] else 1)
    k = torch.randn(pool_blocks, bs, kv_heads, c["head_dim"], generator=g, dtype=torch.float64)
    v = torch.randn(pool_blocks, bs, kv_heads, c["head_dim"], generator=g, dtype=torch.float64)
    if c["head_stride"]:  # every other head of a wider pool: strided heads, unit stride in head_dim
        k, v = k[:, :, ::2], v[:, :, ::2]
    table = torch.randint(0, pool_blocks, (c["batch"], blocks), generator=g)
    delta = torch.randint(-MAX_ABS_DELTA + 1, MAX_ABS_DELTA, (c["batch"], blocks), generator=g)
    delta[:, ::3] = 0  # runs of delta 0 beside large deltas
    table[:, : c["shared"]], delta[:, : c["shared"]] = table[:1, : c["shared"]], delta[:1, : c["shared"]]
    full = blocks * bs
    lens = torch.randint(max(c["q_len"], full - bs + 1), full + 1, (c["batch"],), generator=g)
    lens = full_block_lens(lens, blocks, bs)
    if c["ragged"]:  # entries of any size, empty ones too (what edits off block boundaries leave)
        lens = torch.randint(0, bs + 1, (c["batch"], blocks), generator=g)
        lens[lens.sum(1) < c["q_len"]] = bs
    if c["equal_lengths"]:
        lens = lens[:1].repeat(c["batch"], 1)
    rope = gc.RopeSpec(1.0 / (10000.0 ** (torch.arange(0, c["rotary_dim"], 2, dtype=torch.float64)
                                         / c["rotary_dim"])), c["rotary_dim"], c["interleaved"])
    dt = c["dtype"]
    return q.to(dt), k.to(dt), v.to(dt), table, delta, lens, rope


@settings(max_examples=80)
@given(native_cases())
def test_native_attention_matches_float64_reference(c):
    q, k, v, table, delta, lens, rope = make(c)
    out, lse = gc.rotated_query_attention(q, k, v, table, delta, lens, rope, causal=c["causal"], impl="native",
                                          return_lse=True)
    ref, ref_lse = gc.reference_attention(q.double(), k.double(), v.double(), table, delta, lens, rope,
                                          causal=c["causal"], return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    assert rel_err(out, ref) <= TOL[c["dtype"]], (rel_err(out, ref), c)
    lse_tol = 1e-12 if c["dtype"] == torch.float64 else 1e-5
    assert float((lse.double() - ref_lse).abs().max()) <= lse_tol * max(1.0, float(ref_lse.abs().max()))


@settings(max_examples=40)
@given(native_cases())
def test_native_materialize_equals_the_torch_gather(c):
    """The op's native kernel gives what its torch definition (also its ONNX decomposition) gives."""
    _, k, v, table, delta, lens, rope = make(c)
    k, v = k.contiguous(), v.contiguous()
    lens = lens[:1].repeat(lens.shape[0], 1)  # one view length for all rows
    length = int(lens[0].sum())
    got_k, got_v = gc.materialize_kv(k, v, table, delta, rope, length, lens)
    want_k, want_v = materialize_views(k, v, table, delta, lens, rope.inv_freq, rope.rotary_dim, rope.interleaved,
                                       length)
    assert torch.equal(got_v, want_v)
    assert rel_err(got_k, want_k) <= (1e-15 if c["dtype"] == torch.float64 else 4e-7 if c["dtype"] == torch.float32
                                      else 8e-3)


class _Allocations(TorchDispatchMode):
    """Records every aten op and the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_native_attention_makes_no_gather_copy():
    """A fragmented table (random blocks, random deltas) is read in place: nothing of the pools' size is made."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(256, 16, 2, 64, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(2, 8, 1, 64, generator=g)
    table = torch.stack([torch.randperm(256, generator=g)[:200] for _ in range(2)])
    delta = torch.randint(-(2**31), 2**31, (2, 200), generator=g)
    lens = torch.tensor([3200, 3190])
    rope = gc.RopeSpec.from_base(1e4, 64)
    gc.rotated_query_attention(q, k, v, table, delta, lens, rope, impl="native")  # build outside the mode
    with _Allocations() as seen:
        out = gc.rotated_query_attention(q, k, v, table, delta, lens, rope, impl="native")
    assert not {"index_select", "gather", "index", "cat", "stack", "clone"} & set(seen.ops), seen.ops
    assert seen.largest < k.numel() // 8, seen.largest
    ref = gc.reference_attention(q.double(), k.double(), v.double(), table, delta, lens, rope)
    assert rel_err(out, ref) < 2e-6


def test_a_pool_without_unit_head_dim_stride_takes_the_loop():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(4, 4, 32, 2, generator=g).transpose(2, 3)  # [4, 4, 2, 32], stride 2 along head_dim
    v = torch.randn(4, 4, 32, 2, generator=g).transpose(2, 3)
    q = torch.randn(1, 2, 1, 32, generator=g)
    table, delta, lens = torch.tensor([[2, 0, 3]]), torch.tensor([[5, 0, -9]]), torch.tensor([10])
    rope = gc.RopeSpec.from_base(1e4, 32)
    out = gc.rotated_query_attention(q, k, v, table, delta, lens, rope)
    ref = gc.reference_attention(q.double(), k.double(), v.double(), table, delta, lens, rope)
    assert rel_err(out, ref) < 2e-6


def test_without_a_compiler_the_loop_runs_after_one_warning(monkeypatch):
    monkeypatch.setattr(native, "compiler_missing", lambda: "no C++ compiler ('c++') on PATH")
    native.native_available.cache_clear()
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(3, 4, 1, 16, generator=g), torch.randn(3, 4, 1, 16, generator=g)
    q = torch.randn(1, 2, 1, 16, generator=g)
    table, delta, lens = torch.tensor([[1, 2]]), torch.tensor([[0, 7]]), torch.tensor([7])
    rope = gc.RopeSpec.from_base(1e4, 16)
    try:
        with pytest.warns(RuntimeWarning, match="torch loop instead of the native kernel"):
            out = gc.rotated_query_attention(q, k, v, table, delta, lens, rope)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only once
            again = gc.rotated_query_attention(q, k, v, table, delta, lens, rope)
    finally:
        native.native_available.cache_clear()  # looked up again by the next test, with the compiler back
    assert torch.equal(out, again)
    ref = gc.reference_attention(q.double(), k.double(), v.double(), table, delta, lens, rope)
    assert rel_err(out, ref) < 2e-6


def test_native_is_refused_off_the_cpu_by_name():
    rope = gc.RopeSpec.from_base(1e4, 16)
    q, kv = torch.randn(1, 1, 1, 16, device="meta"), torch.randn(2, 4, 1, 16, device="meta")
    ids = torch.zeros(1, 1, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="impl: 'native' is the CPU kernel"):
        gc.rotated_query_attention(q, kv, kv, ids, ids, torch.ones(1, dtype=torch.long, device="meta"), rope,
                                   impl="native")
