"""ONNX export of the gauge op: one ai.gauge node per attention, run by stock onnxruntime (CPU),
equal to the PyTorch op on random pools, tables and deltas (up to ~2^30), with dynamic dims."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import gaugecompile
from gaugecompile import RopeSpec
from gaugecompile.onnx import DOMAIN, OP_TYPE, export_onnx, run
from gaugecompile.onnx.function import VERSION

TOL32 = 1e-4


class OpModule(torch.nn.Module):
    """Calls the op directly (`layers` times, chained through q) so no pass is needed."""

    def __init__(self, rope: RopeSpec, causal: bool = True, layers: int = 1):
        super().__init__()
        self.rope, self.causal, self.layers = rope, causal, layers

    def forward(self, q, k_pool, v_pool, block_table, block_delta, seq_lens):
        for _ in range(self.layers):
            q, lse = gaugecompile.rotated_query_attention(q, k_pool, v_pool, block_table, block_delta, seq_lens,
                                                          self.rope, causal=self.causal, return_lse=True)
        return q, lse


def make_inputs(gen, *, batch, heads, kv_heads, q_len, head_dim, block_size, num_blocks, max_blocks, delta_mode,
                dtype=torch.float32):
    """Random pool/table/deltas; every view holds at least q_len tokens, unused table slots hold junk."""
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen, dtype=dtype)
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, dtype=dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, dtype=dtype)
    block_table = torch.randint(0, num_blocks, (batch, max_blocks), generator=gen)
    cap = max_blocks * block_size
    seq_lens = torch.randint(q_len, cap + 1, (batch,), generator=gen)
    seq_lens[0] = cap
    if delta_mode == "random":
        block_delta = torch.randint(-5000, 5000, (batch, max_blocks), generator=gen)
    else:  # near +-2^30, where float32 (and naive float64) angles are wrong
        sign = torch.randint(0, 2, (batch, max_blocks), generator=gen) * 2 - 1
        block_delta = sign * (2**30 - torch.randint(0, 4096, (batch, max_blocks), generator=gen))
    for b in range(batch):  # junk past the view: the function must not read it
        used = -(-int(seq_lens[b]) // block_size)
        block_table[b, used:] = 10**6
        block_delta[b, used:] = 2**45
    return q, k_pool, v_pool, block_table, block_delta, seq_lens


def dynamic_shapes():
    batch, q_len = torch.export.Dim("batch"), torch.export.Dim("q_len")
    blocks, pool = torch.export.Dim("max_blocks"), torch.export.Dim("num_blocks")
    return {"q": {0: batch, 2: q_len}, "k_pool": {0: pool}, "v_pool": {0: pool},
            "block_table": {0: batch, 1: blocks}, "block_delta": {0: batch, 1: blocks}, "seq_lens": {0: batch}}


def gauge_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def max_errors(path, module, inputs, providers=None):
    got = run(path, inputs, providers)
    with torch.no_grad():
        want = module(*inputs)
    return [float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True)]


SIZES = [  # batch, q_len, num_blocks, max_blocks: all different from the export example
    (1, 1, 5, 3),
    (3, 4, 12, 6),
    (2, 7, 9, 2),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    rope = RopeSpec.from_base(10000.0, 16)
    module = OpModule(rope)
    gen = torch.Generator().manual_seed(0)
    example = make_inputs(gen, batch=2, heads=4, kv_heads=2, q_len=3, head_dim=16, block_size=4, num_blocks=10,
                          max_blocks=4, delta_mode="random")
    path = tmp_path_factory.mktemp("onnx") / "rqa.onnx"
    model = export_onnx(module, example, path, dynamic_shapes=dynamic_shapes())
    return module, path, model


def test_graph_is_one_custom_node_with_a_function(exported):
    _, path, model = exported
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded, full_check=True)
    nodes = gauge_nodes(loaded)
    assert [n.op_type for n in nodes] == [OP_TYPE]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"rotary_dim": 16, "interleaved": 0, "scale": 0.25, "causal": 1, "block_size": 4}
    assert len(nodes[0].input) == 7 and len(nodes[0].output) == 2
    assert (DOMAIN, OP_TYPE) in {(f.domain, f.name) for f in loaded.functions}
    assert {imp.domain: imp.version for imp in loaded.opset_import}[DOMAIN] == VERSION
    assert model == loaded
    assert isinstance(loaded.graph.input[0].type.tensor_type.shape.dim[0].dim_param, str)


@pytest.mark.parametrize("delta_mode", ["random", "near_2_30"])
@pytest.mark.parametrize("size", SIZES)
def test_matches_torch_on_new_sizes_without_reexport(exported, size, delta_mode):
    module, path, _ = exported
    batch, q_len, num_blocks, max_blocks = size
    gen = torch.Generator().manual_seed(hash((size, delta_mode)) % 2**31)
    inputs = make_inputs(gen, batch=batch, heads=4, kv_heads=2, q_len=q_len, head_dim=16, block_size=4,
                         num_blocks=num_blocks, max_blocks=max_blocks, delta_mode=delta_mode)
    err_out, err_lse = max_errors(path, module, inputs)
    assert err_out < TOL32 and err_lse < TOL32, (err_out, err_lse)


@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
                    reason="this onnxruntime build has no CUDA execution provider")
def test_cuda_provider_matches_torch(exported):
    module, path, _ = exported
    gen = torch.Generator().manual_seed(13)
    for batch, q_len, num_blocks, max_blocks in SIZES:
        inputs = make_inputs(gen, batch=batch, heads=4, kv_heads=2, q_len=q_len, head_dim=16, block_size=4,
                             num_blocks=num_blocks, max_blocks=max_blocks, delta_mode="near_2_30")
        err_out, err_lse = max_errors(path, module, inputs, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert err_out < TOL32 and err_lse < TOL32, (err_out, err_lse)


@pytest.mark.parametrize("interleaved,rotary_dim,causal,heads,kv_heads",
                         [(True, 8, True, 6, 2), (False, 12, False, 3, 3), (True, 16, False, 4, 1)])
def test_interleaved_partial_rotary_gqa(tmp_path, interleaved, rotary_dim, causal, heads, kv_heads):
    rope = RopeSpec.from_base(500.0, rotary_dim, interleaved=interleaved)
    module = OpModule(rope, causal=causal)
    gen = torch.Generator().manual_seed(rotary_dim)
    shape = dict(heads=heads, kv_heads=kv_heads, head_dim=16, block_size=2)
    example = make_inputs(gen, batch=2, q_len=2, num_blocks=8, max_blocks=5, delta_mode="random", **shape)
    path = tmp_path / "rqa.onnx"
    model = export_onnx(module, example, path, dynamic_shapes=dynamic_shapes())
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gauge_nodes(model)[0].attribute}
    assert (attrs["rotary_dim"], attrs["interleaved"], attrs["causal"]) == (rotary_dim, int(interleaved), int(causal))
    for delta_mode in ("random", "near_2_30"):
        inputs = make_inputs(gen, batch=3, q_len=3, num_blocks=11, max_blocks=7, delta_mode=delta_mode, **shape)
        err_out, err_lse = max_errors(path, module, inputs)
        assert err_out < TOL32 and err_lse < TOL32, (delta_mode, err_out, err_lse)


def test_inline_writes_standard_ops_only(tmp_path, exported):
    module, _, _ = exported
    gen = torch.Generator().manual_seed(3)
    example = make_inputs(gen, batch=2, heads=4, kv_heads=2, q_len=3, head_dim=16, block_size=4, num_blocks=10,
                          max_blocks=4, delta_mode="random")
    path = tmp_path / "inline.onnx"
    model = export_onnx(module, example, path, dynamic_shapes=dynamic_shapes(), inline=True)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert not gauge_nodes(model) and not model.functions
    assert DOMAIN not in {imp.domain for imp in model.opset_import}
    for size in SIZES[:2]:
        batch, q_len, num_blocks, max_blocks = size
        inputs = make_inputs(gen, batch=batch, heads=4, kv_heads=2, q_len=q_len, head_dim=16, block_size=4,
                             num_blocks=num_blocks, max_blocks=max_blocks, delta_mode="near_2_30")
        err_out, err_lse = max_errors(path, module, inputs)
        assert err_out < TOL32 and err_lse < TOL32, (err_out, err_lse)


def test_float64_angles_are_exact_near_2_31(tmp_path):
    """In float64 the output error stays ~1e-13 at deltas near 2^31: a float64 product
    delta * inv_freq alone would be off by ~1e-7 rad there."""
    rope = RopeSpec.from_base(10000.0, 16)
    module = OpModule(rope)
    gen = torch.Generator().manual_seed(5)
    shape = dict(heads=2, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float64)
    example = make_inputs(gen, batch=2, q_len=2, num_blocks=6, max_blocks=3, delta_mode="random", **shape)
    path = tmp_path / "f64.onnx"
    export_onnx(module, example, path, dynamic_shapes=dynamic_shapes())
    inputs = list(make_inputs(gen, batch=2, q_len=2, num_blocks=6, max_blocks=3, delta_mode="near_2_30", **shape))
    inputs[4] = inputs[4] * 2 - torch.randint(0, 2, inputs[4].shape, generator=gen)  # up to 2^31 - 1
    used = inputs[4].abs() < 2**40
    inputs[4][~used] = 0
    assert int(inputs[4].abs().max()) > 2**31 - 10**4
    err_out, err_lse = max_errors(path, module, inputs)
    assert err_out < 1e-11 and err_lse < 1e-11, (err_out, err_lse)


def test_one_node_per_layer(tmp_path):
    module = OpModule(RopeSpec.from_base(10000.0, 8, interleaved=True), layers=3)
    gen = torch.Generator().manual_seed(7)
    example = make_inputs(gen, batch=2, heads=2, kv_heads=1, q_len=2, head_dim=8, block_size=4, num_blocks=6,
                          max_blocks=3, delta_mode="random")
    path = tmp_path / "three.onnx"
    model = export_onnx(module, example, path, opset=18)
    assert len(gauge_nodes(model)) == 3
    assert {imp.domain: imp.version for imp in model.opset_import} == {"": 18, DOMAIN: VERSION}
    err_out, err_lse = max_errors(path, module, example)
    assert err_out < TOL32 and err_lse < TOL32, (err_out, err_lse)


def test_export_rejects_bad_arguments(tmp_path):
    module = OpModule(RopeSpec.from_base(10000.0, 8))
    gen = torch.Generator().manual_seed(8)
    example = make_inputs(gen, batch=1, heads=2, kv_heads=1, q_len=1, head_dim=8, block_size=4, num_blocks=3,
                          max_blocks=2, delta_mode="random")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(module, example, tmp_path / "x.onnx", opset=17)
    with pytest.raises(TypeError, match="args"):
        export_onnx(module, example[0], tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="model"):
        export_onnx(lambda *a: a, example, tmp_path / "x.onnx")
