"""The rotated-query op against its definition (gather + re-rotate + softmax) on random cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugecompile as gc
from gaugecompile.block_tables import full_block_lens

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_case(draw_or_rng, *, batch, heads, group, q_len, head_dim, rotary_dim, block_size, blocks_per_seq,
              pool_blocks, dtype, table_kind, delta_range, seed, negated=False):
    g = torch.Generator().manual_seed(seed)
    kv_heads = heads // group
    q = torch.randn(batch, heads, q_len, head_dim, generator=g, dtype=torch.float64)
    k_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    if table_kind == "shared":  # every sequence points at the same blocks
        table = torch.randperm(pool_blocks, generator=g)[:blocks_per_seq].repeat(batch, 1)
    elif table_kind == "contiguous":
        table = torch.arange(blocks_per_seq).repeat(batch, 1)
    else:  # random, with repeats allowed (a block may appear twice in one view)
        table = torch.randint(0, pool_blocks, (batch, blocks_per_seq), generator=g)
    lo, hi = delta_range
    delta = torch.randint(lo, hi, (batch, blocks_per_seq), generator=g, dtype=torch.int64)
    max_len = blocks_per_seq * block_size
    seq_lens = torch.randint(min(max_len, max(q_len, max_len - block_size + 1)), max_len + 1, (batch,), generator=g)
    if table_kind == "beams":  # equal lengths, a common prefix (same blocks, same deltas), then per-row blocks
        prefix = int(torch.randint(0, blocks_per_seq + 1, (), generator=g))
        table[:, :prefix], delta[:, :prefix] = table[:1, :prefix], delta[:1, :prefix]
        seq_lens[:] = seq_lens[0]
    lens = full_block_lens(seq_lens, blocks_per_seq, block_size)
    if table_kind == "ragged":  # entries of any size, empty ones too (what edits off block boundaries leave)
        lens = torch.randint(0, block_size + 1, (batch, blocks_per_seq), generator=g)
        lens[lens.sum(1) < q_len] = block_size
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if negated:  # a model that rotates by -theta (NanoChat)
        inv_freq = -inv_freq
    return [t.to(dtype) for t in (q, k_pool, v_pool)] + [table, delta, lens], inv_freq


@st.composite
def cases(draw, dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16)):
    group = draw(st.sampled_from([1, 2, 4, 8]))
    heads = group * draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([24, 32, 64, 96, 128, 256]))  # 24: not whole 16-lane vectors
    rotary_dim = draw(st.sampled_from([head_dim, head_dim // 2, head_dim // 4]))
    block_size = draw(st.sampled_from([1, 2, 3, 16, 64, 256]))
    max_blocks = max(1, min(12, 512 // block_size))
    blocks_per_seq = draw(st.integers(1, max_blocks))
    big = draw(st.booleans())
    return dict(
        batch=draw(st.integers(1, 3)), heads=heads, group=group,
        q_len=draw(st.sampled_from([1, 1, 2, 5])), head_dim=head_dim, rotary_dim=rotary_dim,
        block_size=block_size, blocks_per_seq=blocks_per_seq, pool_blocks=blocks_per_seq + draw(st.integers(0, 6)),
        dtype=draw(st.sampled_from(dtypes)),
        table_kind=draw(st.sampled_from(["random", "shared", "contiguous", "beams", "ragged"])),
        delta_range=(-(2**31), 2**31) if big else (-64, 64), seed=draw(st.integers(0, 2**31)),
        negated=draw(st.booleans()),
    ), draw(st.booleans()), draw(st.booleans())


def check(params, interleaved, causal, impl="auto"):
    (q, k, v, table, delta, lens), inv_freq = make_case(None, **params)
    if params["q_len"] > int(lens.min()):
        return
    rope = gc.RopeSpec(inv_freq, params["rotary_dim"], interleaved)
    out = gc.rotated_query_attention(q, k, v, table, delta, lens, rope, causal=causal, impl=impl, return_lse=True)
    # float64 definition of correct on the same (rounded) inputs
    ref = gc.reference_attention(q.double(), k.double(), v.double(), table, delta, lens, rope, causal=causal,
                                 return_lse=True)
    dtype = params["dtype"]
    assert out[0].dtype == dtype and out[0].shape == q.shape
    assert rel_err(out[0], ref[0]) <= TOL[dtype], (rel_err(out[0], ref[0]), params)
    lse_tol = 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
    assert float((out[1].double() - ref[1]).abs().max()) <= lse_tol * max(1.0, float(ref[1].abs().max()))


@pytest.mark.parametrize("impl", ["auto", "loop"])  # auto: the native kernel on the CPU
@settings(max_examples=60)
@given(case=cases())
def test_op_matches_reference(impl, case):
    params, interleaved, causal = case
    check(params, interleaved, causal, impl=impl)


@settings(max_examples=15)
@given(cases(dtypes=(torch.float32,)))
def test_reference_in_input_dtype_is_the_float64_reference(case):
    """reference_attention computes in its input dtype; in float32 it agrees with float64."""
    params, interleaved, causal = case
    (q, k, v, table, delta, lens), inv_freq = make_case(None, **params)
    if params["q_len"] > int(lens.min()):
        return
    rope = gc.RopeSpec(inv_freq, params["rotary_dim"], interleaved)
    r32 = gc.reference_attention(q, k, v, table, delta, lens, rope, causal=causal)
    r64 = gc.reference_attention(q.double(), k.double(), v.double(), table, delta, lens, rope, causal=causal)
    assert rel_err(r32, r64) < 1e-5


EDGE = dict(batch=1, heads=2, group=1, q_len=1, head_dim=32, rotary_dim=32, block_size=4, blocks_per_seq=1,
            pool_blocks=1, dtype=torch.float64, table_kind="contiguous", delta_range=(0, 1), seed=0)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "override",
    [
        dict(),  # one block, delta 0
        dict(block_size=1),  # one token
        dict(batch=4, blocks_per_seq=5, pool_blocks=9, table_kind="shared", delta_range=(-10**9, 10**9)),
        dict(blocks_per_seq=6, pool_blocks=6, q_len=7, block_size=3),  # multi-token causal over blocks
        dict(heads=8, group=8, blocks_per_seq=3, pool_blocks=3, delta_range=(2**31 - 5, 2**31)),
        dict(rotary_dim=8, head_dim=64, blocks_per_seq=2, pool_blocks=4, table_kind="random"),
    ],
    ids=["one-block", "one-token", "all-same-blocks", "causal-multi", "gqa8-huge-delta", "partial-rotary"],
)
def test_edge_cases(override, interleaved):
    params = dict(EDGE, **override)
    for causal in (True, False):
        check(params, interleaved, causal)
        check(params, interleaved, causal, impl="loop")


@pytest.mark.parametrize("interleaved", [False, True])
def test_negated_frequencies_rotate_by_minus_theta(interleaved):
    """A basis with negated frequencies (a model rotating by -theta) rotates x to p as the basis rotates it to -p,
    also past 2^31 rad, where the angles are reduced exactly."""
    rope = gc.RopeSpec.from_base(10000.0, 32, interleaved=interleaved)
    minus = gc.RopeSpec(-rope.inv_freq, 32, interleaved)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    positions = torch.tensor([7, 123_456, 2**31 - 1])
    torch.testing.assert_close(minus.apply(x, positions), rope.apply(x, -positions), atol=1e-12, rtol=0)


def test_query_rotation_equals_key_rerotation_in_closed_form():
    """The identity behind the op: R(l_q) q . R(l_k) k == (R(-delta) q_rot) . k_stored."""
    rope = gc.RopeSpec.from_base(10000.0, 64)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 64, generator=g, dtype=torch.float64).unbind(0)
    l_q, p, delta = 5_000_000, 17, 3_000_000_001
    q_rot = rope.apply(q[None], torch.tensor([l_q]))[0]
    k_stored = rope.apply(k[None], torch.tensor([p]))[0]
    k_logical = rope.apply(k[None], torch.tensor([p + delta]))[0]
    cos, sin = rope.cos_sin(torch.tensor([delta]), torch.float64)
    q_back = gc.rope.rotate(q_rot[None], cos, -sin, 64, False)[0]
    assert math.isclose(float(q_rot @ k_logical), float(q_back @ k_stored), rel_tol=1e-9, abs_tol=1e-9)


def test_cpu_kernel_reads_a_shared_prefix_once_for_all_rows(monkeypatch):
    """Cascade: four rows over one 48-block prefix (same blocks, same delta) and 2 blocks of their own read the
    prefix blocks once, not once per row, and still equal the float64 reference."""
    from gaugecompile.ops import paged_attention

    reads = []
    real = paged_attention.tile_kv
    monkeypatch.setattr(paged_attention, "tile_kv",
                        lambda pool, scale, ids, dtype: reads.extend(ids) or real(pool, scale, ids, dtype))
    params = dict(EDGE, batch=4, blocks_per_seq=50, pool_blocks=60, block_size=16, table_kind="beams",
                  delta_range=(-(2**31), 2**31), dtype=torch.float64)
    (q, k, v, table, delta, lens), inv_freq = make_case(None, **params)
    table[:, :48], delta[:, :48] = torch.arange(48), 7
    table[:, 48:] = torch.arange(48, 56).view(4, 2)
    lens[:] = 16
    out, lse = paged_attention.paged_attention(q, k, v, table, delta, lens, inv_freq, 32, False, 0.1, True)
    rope = gc.RopeSpec(inv_freq, 32, False)
    ref, ref_lse = gc.reference_attention(q, k, v, table, delta, lens, rope, scale=0.1, causal=True, return_lse=True)
    assert rel_err(out, ref) < 1e-12 and float((lse - ref_lse).abs().max()) < 1e-10
    assert len(reads) == 2 * (48 + 4 * 2)  # K and V: the prefix once, each row's own blocks once


def test_cpu_kernel_reads_contiguous_tiles_as_views(monkeypatch):
    """No gather of the cache for a contiguous mapping: index_select is never called."""
    from gaugecompile.ops import paged_attention

    calls = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda self, *a: calls.append(a) or real(self, *a))
    params = dict(EDGE, blocks_per_seq=64, pool_blocks=64, block_size=16, table_kind="contiguous",
                  delta_range=(5, 6))
    (q, k, v, table, delta, lens), inv_freq = make_case(None, **params)
    paged_attention.paged_attention(q, k, v, table, delta, lens, inv_freq, 32, False, 0.1, True)
    assert calls == []


@pytest.mark.parametrize("length", [0, 5])
def test_no_queries_gives_empty_outputs(length):
    """q_len 0 (allowed: seq_lens >= q_len) returns empty out/lse, also over an empty view with no key to read."""
    rope = gc.RopeSpec.from_base(1e4, 16)
    q, kv = torch.randn(2, 2, 0, 16), torch.randn(3, 4, 2, 16)
    table, delta = torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0, 3], [1, 0]])
    out, lse = gc.rotated_query_attention(q, kv, kv, table, delta, torch.tensor([length, length]), rope,
                                          return_lse=True)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
