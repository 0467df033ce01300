"""The re-rotating sink cache baseline against straightforward recomputation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gaugecompile.bench.baselines import RerotatingSinkCache, SinkLayer, rope_of_model
from gaugecompile.models import random_model
from gaugecompile.rope import RopeSpec

ROPE = RopeSpec.from_base(10000.0, 8)


@given(
    sink=st.integers(0, 3), window=st.integers(1, 8), multiple=st.integers(1, 3),
    steps=st.lists(st.integers(1, 4), min_size=1, max_size=12), seed=st.integers(0, 2**16),
)
def test_layer_matches_token_list_model(sink, window, multiple, steps, seed):
    """Attention sees R(index in cache) k for sinks + recent tokens + new; then the cache evicts to make room."""
    capacity = sink + window
    layer = SinkLayer(ROPE, sink, capacity, multiple)
    gen = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []  # raw (unrotated) keys of the tokens the cache should hold, in order
    for q in steps:
        q = min(q, capacity - len(held))
        raw = torch.randn(1, 2, q, 8, generator=gen, dtype=torch.float64)
        start = len(held)
        assert layer.get_seq_length() == start and layer.get_mask_sizes(q) == (start + q, 0)
        out_k, out_v = layer.update(ROPE.apply(raw, torch.arange(start, start + q)), raw.clone())
        held += list(raw.unbind(2))
        expected_raw = torch.stack(held, dim=2)
        torch.testing.assert_close(out_k, ROPE.apply(expected_raw, torch.arange(len(held))), rtol=0, atol=1e-12)
        torch.testing.assert_close(out_v, expected_raw, rtol=0, atol=0)
        overflow = len(held) + 1 - capacity
        if overflow > 0:
            evict = min(-(-overflow // multiple) * multiple, len(held) - sink)
            held = held[:sink] + held[sink + evict:]
    with pytest.raises(ValueError, match="key_states"):
        too_many = capacity - len(held) + 1
        layer.update(torch.zeros(1, 2, too_many, 8, dtype=torch.float64), torch.zeros(1, 2, too_many, 8))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_layer_model_equals_recomputation_from_scratch(arch):
    """With one layer a key depends only on its token and position, so a re-rotated cache must equal
    running the model from scratch on the kept tokens at positions 0..n-1 (up to the float32 angles
    transformers uses for RoPE)."""
    model = random_model(arch, num_hidden_layers=1, dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    sink, window = 2, 9
    cache = RerotatingSinkCache.for_model(model, num_sink_tokens=sink, window_length=window)
    kept: list[int] = []
    with torch.no_grad():
        model(ids[:, :5], past_key_values=cache, use_cache=True)
        kept = ids[0, :5].tolist()
        for t in range(5, ids.shape[1]):
            logits = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            kept.append(ids[0, t].item())
            scratch = model(torch.tensor([kept])).logits[0, -1]
            torch.testing.assert_close(logits, scratch, rtol=0, atol=1e-6)  # model: float32 angles
            if len(kept) == sink + window:
                kept = kept[:sink] + kept[sink + 1:]
            assert cache.get_seq_length() == len(kept)


def test_refuses_bad_arguments():
    model = random_model("llama")
    with pytest.raises(ValueError, match="window_length"):
        RerotatingSinkCache(rope_of_model(model), 2, num_sink_tokens=4, window_length=0)
    with pytest.raises(TypeError, match="rope"):
        RerotatingSinkCache(1.0, 2, num_sink_tokens=4, window_length=8)
    with pytest.raises(ValueError, match="rotary_emb"):
        rope_of_model(torch.nn.Linear(2, 2))
