"""The generated Triton kernels (run by Triton's CPU interpreter here) against the reference.

conftest.py sets TRITON_INTERPRET=1 before triton is imported.  Sizes are tiny: the interpreter
runs every program in Python.  With GAUGECOMPILE_TRITON_DEVICE=cuda (the GPU check) the kernels
compile for real and the inputs live on that device; the float64 reference always runs on the CPU.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugecompile as gc
from gaugecompile.block_tables import full_block_lens
from gaugecompile.ops.triton_attention import triton_attention

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
#: Where the kernels run: the CPU (interpreter) unless conftest.py's GAUGECOMPILE_TRITON_DEVICE says otherwise.
DEVICE = torch.device(os.environ.get("GAUGECOMPILE_TRITON_DEVICE") or "cpu")


def cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on the CPU, for the reference (a no-op there)."""
    return [t.cpu() for t in tensors]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_case(*, batch=1, kv_heads=1, group=1, q_len=1, head_dim=32, rotary_dim=None, block_size=4, blocks=2,
              spare_blocks=2, dtype=torch.float32, table="random", delta_bound=64, full=False, ragged=False,
              seed=0):
    """Random pools, a block table of the given kind, deltas in [-delta_bound, delta_bound), ragged lengths;
    with `ragged`, entries holding any number of tokens (empty and partial ones anywhere, as edits off block
    boundaries leave them).

    Entries holding no tokens are garbage (-1, huge deltas): the kernels must not read them.
    """
    g = torch.Generator().manual_seed(seed)
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    pool = blocks + spare_blocks
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=g, dtype=torch.float64)
    k_pool = torch.randn(pool, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v_pool = torch.randn(pool, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    if table == "shared":  # every sequence reads the same physical blocks
        block_table = torch.randperm(pool, generator=g)[:blocks].repeat(batch, 1)
    elif table == "permuted":  # each sequence a different permutation of the pool
        block_table = torch.stack([torch.randperm(pool, generator=g)[:blocks] for _ in range(batch)])
    elif table == "contiguous":
        block_table = torch.arange(blocks).repeat(batch, 1)
    else:  # random, repeats allowed
        block_table = torch.randint(0, pool, (batch, blocks), generator=g)
    block_delta = torch.randint(-delta_bound, delta_bound, (batch, blocks), generator=g, dtype=torch.int64)
    max_len = blocks * block_size
    if full:
        seq_lens = torch.full((batch,), max_len)
    else:
        seq_lens = torch.randint(q_len, max_len + 1, (batch,), generator=g)
    block_lens = full_block_lens(seq_lens, blocks, block_size)
    if ragged:
        block_lens = torch.randint(0, block_size + 1, (batch, blocks), generator=g)
        block_lens[:, -1] = block_size  # at least q_len tokens per row
    used = block_lens > 0
    block_table = block_table.masked_fill(~used, -1)
    block_delta = block_delta.masked_fill(~used, 2**60)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    tensors = [t.to(dtype) for t in (q, k_pool, v_pool)] + [block_table, block_delta, block_lens]
    return [t.to(DEVICE) for t in tensors], inv_freq.to(DEVICE), rotary_dim


def check(case, *, interleaved, causal, num_splits=None, scale=None):
    """Kernel output and lse against the float64 reference on the same (rounded) inputs; returns the errors."""
    (q, k, v, table, delta, lens), inv_freq, rotary_dim = case
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = triton_attention(q, k, v, table, delta, lens, inv_freq, rotary_dim, interleaved, scale, causal,
                                num_splits=num_splits)
    rope = gc.RopeSpec(inv_freq, rotary_dim, interleaved)
    ref_out, ref_lse = gc.reference_attention(*cpu(q.double(), k.double(), v.double(), table, delta, lens), rope,
                                              scale=scale, causal=causal, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    err_out = rel_err(out, ref_out)
    err_lse = float((lse.double().cpu() - ref_lse).abs().max()) / max(1.0, float(ref_lse.abs().max()))
    assert err_out <= TOL[q.dtype], (err_out, q.dtype)
    assert err_lse <= LSE_TOL[q.dtype], (err_lse, q.dtype)
    return err_out, err_lse


@st.composite
def cases(draw):
    group = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([32, 64, 96, 128]))
    block_size = draw(st.sampled_from([1, 2, 3, 5, 16, 24, 64]))
    big = draw(st.booleans())
    params = dict(
        batch=draw(st.integers(1, 2)), kv_heads=draw(st.integers(1, 2)), group=group,
        q_len=draw(st.sampled_from([1, 1, 2, 5])), head_dim=head_dim,
        rotary_dim=draw(st.sampled_from([head_dim, head_dim // 2, 8])),
        block_size=block_size, blocks=draw(st.integers(1, max(1, min(5, 64 // block_size)))),
        spare_blocks=draw(st.integers(0, 3)), dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16,
                                                                            torch.bfloat16, torch.float64])),
        table=draw(st.sampled_from(["random", "shared", "permuted", "contiguous"])),
        delta_bound=2**31 if big else 64, ragged=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
    )
    params["q_len"] = min(params["q_len"], block_size if params["ragged"] else params["blocks"] * block_size)
    return params, draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from([None, 1, 2, 3]))


@settings(max_examples=30)
@given(cases())
def test_kernels_match_reference(case):
    params, interleaved, causal, num_splits = case
    check(make_case(**params), interleaved=interleaved, causal=causal, num_splits=num_splits)


EDGE = dict(batch=2, kv_heads=1, group=2, q_len=1, head_dim=32, block_size=4, blocks=3, seed=3)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "override",
    [
        dict(),
        dict(block_size=1, blocks=6, table="permuted"),
        dict(block_size=64, blocks=1, head_dim=128, full=True),
        dict(group=4, kv_heads=2, q_len=3, blocks=4, causal=True),
        dict(head_dim=96, rotary_dim=24, block_size=5, blocks=3, table="shared"),  # partial rotary, odd block
        dict(delta_bound=2**31, blocks=5, table="shared", full=True, split=4),  # huge deltas, split-KV
        dict(q_len=7, block_size=3, blocks=4, causal=True, split=3),  # causal multi-token across splits
        dict(dtype=torch.float16, group=4, blocks=4, split=2),
        dict(dtype=torch.bfloat16, q_len=2, causal=True),
        dict(dtype=torch.float64, group=1, q_len=2, rotary_dim=16, causal=True, split=2),
        dict(ragged=True, q_len=3, blocks=6, causal=True, split=2, seed=8),  # partial and empty entries, causal
        dict(ragged=True, blocks=5, table="shared", dtype=torch.float64, seed=9),
    ],
    ids=["base", "bs1-permuted", "bs64-d128", "gqa4-multi", "partial-rotary", "huge-delta-split", "causal-split",
         "fp16-gqa4-split", "bf16-causal", "fp64-split", "ragged-causal-split", "ragged-shared-fp64"],
)
def test_edge_cases(override, interleaved):
    override = dict(override)
    causal = override.pop("causal", False)
    split = override.pop("split", None)
    check(make_case(**dict(EDGE, **override)), interleaved=interleaved, causal=causal, num_splits=split)


def test_split_kv_equals_single_pass():
    """The flash-decoding variant (partials + log-sum-exp merge) gives the one-pass result."""
    case = make_case(batch=1, kv_heads=2, group=2, block_size=2, blocks=8, full=True, table="permuted",
                     delta_bound=2**31, seed=11)
    (q, k, v, table, delta, lens), inv_freq, rotary_dim = case
    one = triton_attention(q, k, v, table, delta, lens, inv_freq, rotary_dim, False, 0.2, True, num_splits=1)
    for splits in (2, 5, 8):
        many = triton_attention(q, k, v, table, delta, lens, inv_freq, rotary_dim, False, 0.2, True,
                                num_splits=splits)
        assert rel_err(many[0], one[0]) < 1e-6 and rel_err(many[1], one[1]) < 1e-6


def test_public_wrapper_impl_triton_and_autograd():
    """impl='triton' runs the kernels; gradients flow through the triton op's autograd."""
    (q, k, v, table, delta, lens), inv_freq, rotary_dim = make_case(
        batch=2, group=2, q_len=2, blocks=2, dtype=torch.float64, table="permuted", seed=5)
    rope = gc.RopeSpec(inv_freq, rotary_dim, False)
    out = gc.rotated_query_attention(q, k, v, table, delta, lens, rope, impl="triton")
    ref = gc.reference_attention(*cpu(q, k, v, table, delta, lens), rope)
    assert rel_err(out, ref) < 1e-10

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = triton_attention(*leaves, table, delta, lens, inv_freq, rotary_dim, False, 0.3, True)
    (out.sum() + lse.sum()).backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in cpu(q, k, v)]
    ref_out, ref_lse = gc.reference_attention(*ref_leaves, *cpu(table, delta, lens), rope, scale=0.3,
                                              return_lse=True)
    (ref_out.sum() + ref_lse.sum()).backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert rel_err(got.grad, want.grad) < 1e-9


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_torch_compile(backend):
    """The triton op traces (fake kernel = the launcher on fake tensors) and runs inside compiled graphs."""
    torch._dynamo.reset()
    (q, k, v, table, delta, lens), inv_freq, rotary_dim = make_case(
        batch=2, kv_heads=2, group=2, blocks=3, table="permuted", full=True, seed=7)

    def f(q, k, v, table, delta, lens, inv_freq):
        out, lse = triton_attention(q, k, v, table, delta, lens, inv_freq, rotary_dim, True, 0.25, True)
        return out * 2.0, lse + 1.0

    eager = f(q, k, v, table, delta, lens, inv_freq)
    compiled = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, table, delta, lens, inv_freq)
    assert rel_err(compiled[0], eager[0]) < 1e-6 and rel_err(compiled[1], eager[1]) < 1e-6
    rope = gc.RopeSpec(inv_freq, rotary_dim, True)
    ref = gc.reference_attention(*cpu(q.double(), k.double(), v.double(), table, delta, lens), rope, scale=0.25)
    assert rel_err(compiled[0] / 2, ref) < 1e-5


def test_num_splits_is_validated():
    (q, k, v, table, delta, lens), inv_freq, rotary_dim = make_case()
    with pytest.raises(ValueError, match="num_splits"):
        triton_attention(q, k, v, table, delta, lens, inv_freq, rotary_dim, False, 0.1, True, num_splits=0)
