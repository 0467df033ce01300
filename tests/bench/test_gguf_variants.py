"""The F16 GGUF written from a transformers checkpoint for llama.cpp (`bench.gguf_variants`): names, types,
metadata, and the query/key row order that makes llama.cpp's adjacent-pair RoPE compute transformers' rotate-half
RoPE."""

from pathlib import Path

import gguf
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from gaugecompile.bench.gguf_variants import adjacent_pairs, write_f16
from gaugecompile.models import random_model
from gaugecompile.rope import RopeSpec


@given(heads=st.integers(1, 4), half=st.integers(1, 8), seed=st.integers(0, 2**16))
def testadjacent_pairs_turn_rotate_half_into_interleaved(heads, half, seed):
    """Rotating x @ W.T with rotate-half pairs equals rotating x @ P(W).T with adjacent pairs, then undoing P."""
    d = 2 * half
    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(heads * d, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen,
                                                                                      dtype=torch.float64)
    pos = torch.arange(3)
    half_rope, pair_rope = RopeSpec.from_base(100.0, d), RopeSpec.from_base(100.0, d, interleaved=True)
    want = half_rope.apply((x @ w.T).view(3, heads, d).transpose(0, 1), pos[None].expand(heads, -1))
    p = torch.from_numpy(adjacent_pairs(w.numpy(), heads))
    got = pair_rope.apply((x @ p.T).view(3, heads, d).transpose(0, 1), pos[None].expand(heads, -1))
    order = torch.from_numpy(adjacent_pairs(np.arange(d)[:, None], 1)[:, 0])  # adjacent-pair dim -> source dim
    torch.testing.assert_close(got[..., torch.argsort(order)], want, rtol=0, atol=1e-12)


def test_write_f16_keeps_metadata_and_every_tensor(tmp_path: Path):
    model = random_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    shipped = tmp_path / "tiny.Q4_1.gguf"
    writer = gguf.GGUFWriter(str(shipped), "llama")
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_uint32("llama.attention.head_count_kv", 2)
    writer.add_uint32("general.file_type", 3)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = write_f16(tmp_path / "ckpt", shipped, tmp_path / "tiny.F16.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == 1
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    tensors = {t.name: t for t in reader.tensors}
    params = dict(model.named_parameters())
    assert len(tensors) == len(params)
    q = params["model.layers.1.self_attn.q_proj.weight"].detach().numpy()
    stored = np.asarray(tensors["blk.1.attn_q.weight"].data, dtype=np.float32).reshape(q.shape)
    np.testing.assert_allclose(stored, adjacent_pairs(q, 4), atol=1e-3)
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "F16"


def test_weight_type_is_read_from_the_file_name():
    from gaugecompile.bench.gguf_variants import weight_type

    assert weight_type(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "Q4_1"
    assert weight_type(Path("/cache/model.v2.F16.gguf")) == "F16"
