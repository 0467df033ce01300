"""The op as a torch.library citizen: opcheck, gradcheck, torch.compile(fullgraph), torch.export, errors."""

import pytest
import torch

import gaugecompile as gc

ROPE = gc.RopeSpec.from_base(10000.0, 16)


def small_inputs(dtype=torch.float64, q_len=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, 16, generator=g, dtype=dtype)
    k = torch.randn(6, 4, 2, 16, generator=g, dtype=dtype)
    v = torch.randn(6, 4, 2, 16, generator=g, dtype=dtype)
    table = torch.tensor([[3, 0, 5], [1, 1, 2]])
    delta = torch.tensor([[7, -3, 2**30], [0, 100, -(2**31)]])
    lens = torch.tensor([[4, 3, 4], [2, 4, 3]])  # tokens per entry: partial ones in the middle too
    return q, k, v, table, delta, lens


def op_args(q, k, v, table, delta, lens, causal=True):
    return (q, k, v, table, delta, lens, ROPE.inv_freq, ROPE.rotary_dim, ROPE.interleaved, 0.25, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_opcheck(causal):
    inputs = small_inputs()
    q, k, v = (t.requires_grad_() for t in inputs[:3])
    result = torch.library.opcheck(torch.ops.gauge.rotated_query_attention.default,
                                   op_args(q, k, v, *inputs[3:], causal=causal))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_q_k_v(interleaved):
    g = torch.Generator().manual_seed(3)
    rope = gc.RopeSpec.from_base(100.0, 4, interleaved=interleaved)  # partial rotary: 4 of 8 dims
    q = torch.randn(2, 2, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    table, delta = torch.tensor([[2, 0], [1, 1]]), torch.tensor([[5, -2**30], [0, 3]])
    for lens in (torch.tensor([4, 3]), torch.tensor([[1, 2], [2, 1]])):  # plain views, then partial entries

        def f(q, k, v, lens=lens):
            return gc.rotated_query_attention(q, k, v, table, delta, lens, rope, return_lse=True)

        assert torch.autograd.gradcheck(f, (q, k, v))


def test_materialize_gradcheck_over_partial_entries():
    g = torch.Generator().manual_seed(4)
    rope = gc.RopeSpec.from_base(100.0, 8, interleaved=False)
    k = torch.randn(4, 3, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 3, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    table, delta = torch.tensor([[2, 0, 3], [1, 1, 0]]), torch.tensor([[5, -2**30, 7], [0, 3, 9]])
    lens = torch.tensor([[1, 0, 3], [2, 2, 0]])

    def f(k, v):
        return gc.materialize_kv(k, v, table, delta, rope, 4, lens)

    assert torch.autograd.gradcheck(f, (k, v))


def test_gradients_equal_reference_gradients():
    inputs = small_inputs()
    grads = []
    for impl in ("auto", "reference"):
        q, k, v = (t.clone().requires_grad_() for t in inputs[:3])
        gc.rotated_query_attention(q, k, v, *inputs[3:], ROPE, impl=impl).pow(2).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


class Attend(torch.nn.Module):
    def forward(self, q, k, v, table, delta, lens):
        return gc.rotated_query_attention(q, k, v, table, delta, lens, ROPE)


def test_compile_fullgraph_matches_eager():
    inputs = small_inputs(torch.float32)
    compiled = torch.compile(Attend(), fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*inputs), Attend()(*inputs), rtol=1e-5, atol=1e-5)


def test_export_keeps_one_op_node():
    inputs = small_inputs(torch.float32)
    ep = torch.export.export(Attend(), inputs)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.gauge.rotated_query_attention.default) == 1
    torch.testing.assert_close(ep.module()(*inputs), Attend()(*inputs))


def test_materialize_then_sdpa_equals_op():
    q, k, v, table, delta, _ = small_inputs()
    length = 9
    keys, values = gc.materialize_kv(k, v, table, delta, ROPE, length)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True, scale=0.25)
    causal = gc.rotated_query_attention(q, k, v, table, delta, torch.tensor([length] * 2), ROPE, scale=0.25,
                                        causal=False)
    torch.testing.assert_close(sdpa, causal, rtol=1e-12, atol=1e-12)


def _bad(name, **changes):
    q, k, v, table, delta, lens = small_inputs()
    args = dict(q=q, k_pool=k, v_pool=v, block_table=table, block_delta=delta, seq_lens=lens, rope=ROPE)
    args.update(changes)
    return name, args


@pytest.mark.parametrize(
    "name,args,exc",
    [
        (*_bad("block_table", block_table=torch.tensor([[3, 0, 6], [1, 1, 2]])), ValueError),
        (*_bad("block_table", block_table=torch.tensor([[3, -1, 5], [1, 1, 2]])), ValueError),
        (*_bad("block_delta", block_delta=torch.zeros(2, 2, dtype=torch.long)), ValueError),
        (*_bad("block_delta", block_delta=torch.full((2, 3), 2**47)), ValueError),
        (*_bad("seq_lens", seq_lens=torch.tensor([13, 9])), ValueError),
        (*_bad("seq_lens", seq_lens=torch.tensor([1, 9])), ValueError),
        (*_bad("block_lens: row 0, entry 0 holds 5", seq_lens=torch.tensor([[5, 3, 3], [2, 4, 3]])), ValueError),
        (*_bad("block_lens: expected the shape of block_table", seq_lens=torch.tensor([[4, 3], [2, 4]])), ValueError),
        (*_bad("block_lens: .*at least .*2 query tokens", seq_lens=torch.tensor([[0, 0, 1], [2, 4, 3]])), ValueError),
        (*_bad("num_heads", q=torch.randn(2, 3, 2, 16, dtype=torch.float64)), ValueError),
        (*_bad("k_pool", k_pool=torch.randn(6, 4, 2, 16, dtype=torch.float32)), TypeError),
        (*_bad("v_pool", v_pool=torch.randn(6, 4, 2, 8, dtype=torch.float64)), ValueError),
        (*_bad("rotary_dim", rope=gc.RopeSpec(torch.ones(10))), ValueError),
        (*_bad("block_table", block_table=torch.zeros(2, 3)), TypeError),
        (*_bad("rope", rope="llama"), TypeError),
        (*_bad("device", k_pool=torch.randn(6, 4, 2, 16, dtype=torch.float64, device="meta")), ValueError),
    ],
    ids=["block-id-too-large", "block-id-negative", "delta-shape", "delta-too-large", "seq-len-too-long",
         "seq-len-below-q-len", "block-count-too-large", "block-lens-shape", "block-lens-below-q-len",
         "heads-not-divisible", "dtype-mismatch", "pool-shape", "rotary-dim-too-big",
         "float-table", "rope-type", "device-mismatch"],
)
def test_bad_input_names_the_argument(name, args, exc):
    with pytest.raises(exc, match=name):
        gc.rotated_query_attention(**args)


def test_odd_rotary_dim_is_rejected():
    with pytest.raises(ValueError, match="rotary_dim"):
        gc.RopeSpec(torch.ones(3), rotary_dim=7)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        gc.rotated_query_attention(*small_inputs(), ROPE, impl="cuda")


def test_mapping_checks_read_each_forward_once_and_recheck_edits():
    """The layers of a forward pass the same mapping tensors: they are read once (on a GPU a host sync per
    forward, not per layer); a tensor edited in place (its version moves) is read again."""
    from gaugecompile import block_tables

    q, k, v, table, delta, lens = small_inputs()
    reads = []
    real = block_tables.mapping_summary
    block_tables.mapping_summary = lambda *a: reads.append(1) or real(*a)
    try:
        for _ in range(3):
            gc.rotated_query_attention(q, k, v, table, delta, lens, ROPE, impl="loop")
        assert len(reads) == 1
        table[0, 0] = 6  # out of the pool
        with pytest.raises(ValueError, match="block_table: block ids must lie in"):
            gc.rotated_query_attention(q, k, v, table, delta, lens, ROPE, impl="loop")
        assert len(reads) == 2
    finally:
        block_tables.mapping_summary = real
