"""Export of a materialising attention (materialize_kv + sdpa), the pattern the gauge passes rewrite:
rewritten, it is one ai.gauge node; left in place (a refused site), it exports in standard ops.
Either way onnxruntime equals PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from gaugecompile.passes import GaugeRefusedError

import gaugecompile
from gaugecompile import RopeSpec
from gaugecompile.onnx import DOMAIN, export_onnx, run

TOL32 = 1e-4


class MaterialisingAttention(torch.nn.Module):
    """What a cache does eagerly: gather + re-rotate the whole view, then plain sdpa (GQA)."""

    def __init__(self, rope: RopeSpec, block_size: int, cast: bool = False):
        super().__init__()
        self.rope, self.block_size, self.cast = rope, block_size, cast

    def forward(self, q, k_pool, v_pool, block_table, block_delta):
        length = block_table.shape[1] * self.block_size
        k, v = gaugecompile.materialize_kv(k_pool, v_pool, block_table, block_delta, self.rope, length)
        if self.cast:  # a cast to the same dtype, as caches write it: an aten.to node in the exported graph
            k, v = k.to(q.dtype), v.to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class BiasedAttention(MaterialisingAttention):
    """A soft additive bias over the keys: the op cannot express it, so the passes must refuse the site."""

    def forward(self, q, k_pool, v_pool, block_table, block_delta):
        length = block_table.shape[1] * self.block_size
        k, v = gaugecompile.materialize_kv(k_pool, v_pool, block_table, block_delta, self.rope, length)
        bias = -0.1 * torch.arange(length, dtype=q.dtype).view(1, 1, 1, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def inputs(gen, batch, q_len, num_blocks, max_blocks, *, rope_dim=16, heads=4, kv_heads=2, block_size=4):
    q = torch.randn(batch, heads, q_len, rope_dim, generator=gen)
    k_pool = torch.randn(num_blocks, block_size, kv_heads, rope_dim, generator=gen)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, rope_dim, generator=gen)
    table = torch.randint(0, num_blocks, (batch, max_blocks), generator=gen)
    sign = torch.randint(0, 2, (batch, max_blocks), generator=gen) * 2 - 1
    delta = sign * (2**30 - torch.randint(0, 10**5, (batch, max_blocks), generator=gen))
    return q, k_pool, v_pool, table, delta


def dynamic_shapes():
    batch, q_len = torch.export.Dim("batch"), torch.export.Dim("q_len")
    blocks, pool = torch.export.Dim("max_blocks", max=4096), torch.export.Dim("num_blocks")
    return ({0: batch, 2: q_len}, {0: pool}, {0: pool}, {0: batch, 1: blocks}, {0: batch, 1: blocks})


def check_parity(path, module, gen, sizes):
    for batch, q_len, num_blocks, max_blocks in sizes:
        feeds = inputs(gen, batch, q_len, num_blocks, max_blocks)
        (got,) = run(path, feeds)
        with torch.no_grad():
            err = float(np.abs(got - module(*feeds).numpy()).max())
        assert err < TOL32, err


@pytest.mark.parametrize("interleaved,rotary_dim", [(False, 16), (True, 10)])
def test_refused_site_exports_in_standard_ops(tmp_path, interleaved, rotary_dim):
    module = BiasedAttention(RopeSpec.from_base(10000.0, rotary_dim, interleaved=interleaved), 4)
    gen = torch.Generator().manual_seed(rotary_dim)
    path = tmp_path / "refused.onnx"
    with pytest.warns(UserWarning, match="site left in standard ops"):
        model = export_onnx(module, inputs(gen, 2, 3, 6, 2), path, dynamic_shapes=dynamic_shapes())
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert not [n for n in model.graph.node if n.domain == DOMAIN]
    check_parity(path, module, gen, [(1, 1, 5, 3), (3, 2, 9, 5)])


def test_strict_raises_on_a_refused_site(tmp_path):
    module = BiasedAttention(RopeSpec.from_base(10000.0, 16), 4)
    gen = torch.Generator().manual_seed(2)
    with pytest.raises(GaugeRefusedError):
        export_onnx(module, inputs(gen, 2, 3, 6, 2), tmp_path / "strict.onnx", strict=True)


class InputMaskAttention(MaterialisingAttention):
    """A mask given as an input: compiled, the site becomes the masked op with a run-time fallback; exported,
    there is no fallback path, so the site is refused and exports in standard ops."""

    def forward(self, q, k_pool, v_pool, block_table, block_delta, mask):
        length = block_table.shape[1] * self.block_size
        k, v = gaugecompile.materialize_kv(k_pool, v_pool, block_table, block_delta, self.rope, length)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_input_mask_refused_in_export(tmp_path):
    module = InputMaskAttention(RopeSpec.from_base(10000.0, 16), 4)
    feeds = (*inputs(torch.Generator().manual_seed(4), 2, 1, 6, 2), torch.zeros(2, 1, 1, 8))
    with pytest.raises(GaugeRefusedError, match="run-time mask checks are off"):
        export_onnx(module, feeds, tmp_path / "mask.onnx", strict=True)
    with pytest.warns(UserWarning, match="site left in standard ops"):
        export_onnx(module, feeds, tmp_path / "mask.onnx")
    (got,) = run(tmp_path / "mask.onnx", feeds)
    with torch.no_grad():
        assert float(np.abs(got - module(*feeds).numpy()).max()) < TOL32


@pytest.mark.parametrize("cast", [False, True])
def test_passes_rewrite_the_site_into_one_node(tmp_path, cast):
    module = MaterialisingAttention(RopeSpec.from_base(10000.0, 16), 4, cast=cast)
    gen = torch.Generator().manual_seed(11)
    path = tmp_path / "rewritten.onnx"
    example = inputs(gen, 2, 3, 6, 2)
    model = export_onnx(module, example, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert [n.op_type for n in model.graph.node if n.domain == DOMAIN] == ["RotatedQueryAttention"]
    assert not [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]  # no key re-rotation left
    for _ in range(2):
        feeds = inputs(gen, 2, 3, 6, 2)
        (got,) = run(path, feeds)
        with torch.no_grad():
            err = float(np.abs(got - module(*feeds).numpy()).max())
        assert err < TOL32, err


class RotatingAttention(torch.nn.Module):
    """Rotates its own queries (rotate-half, `positions * inv_freq` from a buffer) over a cache whose RoPE may
    differ: the export must compare the two bases, since the ONNX graph cannot raise at run time."""

    def __init__(self, model_base: float, cache_rope: RopeSpec, block_size: int):
        super().__init__()
        self.register_buffer("inv_freq", RopeSpec.from_base(model_base, 16).inv_freq.float())
        self.rope, self.block_size = cache_rope, block_size

    def forward(self, q, k_pool, v_pool, block_table, block_delta):
        length = block_table.shape[1] * self.block_size
        pos = torch.arange(length - q.shape[2], length, device=q.device)
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        q1, q2 = q.chunk(2, dim=-1)
        q = q * emb.cos() + torch.cat((-q2, q1), -1) * emb.sin()
        k, v = gaugecompile.materialize_kv(k_pool, v_pool, block_table, block_delta, self.rope, length)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("cache_base", [10000.0, 500000.0])
def test_export_compares_the_model_and_cache_rope_bases(tmp_path, cache_base):
    """Issue 14, finding 7: a cache whose rope theta differs from the model's is refused at export, naming rope."""
    module = RotatingAttention(10000.0, RopeSpec.from_base(cache_base, 16), block_size=4)
    example = inputs(torch.Generator().manual_seed(3), 2, 1, 6, 3)
    if cache_base != 10000.0:
        with pytest.raises(ValueError, match="rope: the model rotates its queries with inv_freq"):
            export_onnx(module, example, tmp_path / "m.onnx")
        return
    proto = export_onnx(module, example, tmp_path / "m.onnx")
    assert [n.op_type for n in proto.graph.node if n.domain == DOMAIN] == ["RotatedQueryAttention"]
    (got,) = run(tmp_path / "m.onnx", example)
    with torch.no_grad():
        want = module(*example)
    assert float(np.abs(got - want.numpy()).max()) < TOL32
