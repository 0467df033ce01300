"""ManifoldCache under `generate()`: same tokens and logits as DynamicCache; beams share the prompt's blocks."""

import pytest
import torch
from transformers import DynamicCache

from gaugecompile.cache import ManifoldCache, rope_from_config
from gaugecompile.models import random_model
from gaugecompile.models.random_configs import ARCHITECTURES, random_config

LLAMA = random_model("llama")


def _prompt(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, cache, ids, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    kw.setdefault("pad_token_id", 0)
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=12,
                          return_dict_in_generate=True, output_logits=True, **kw)


def _cache(model, **kw) -> ManifoldCache:
    return ManifoldCache(model.config, max_batch_size=16, max_tokens=kw.pop("max_tokens", 1024), **kw)


def _assert_same(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_equals_dynamic_cache(block_size):
    ids = _prompt(2, 21)
    want = _generate(LLAMA, DynamicCache(config=LLAMA.config), ids, do_sample=False)
    _assert_same(_generate(LLAMA, _cache(LLAMA, block_size=block_size), ids, do_sample=False), want)


def test_beam_search_equals_dynamic_cache():
    ids = _prompt(2, 13, seed=1)
    kw = dict(num_beams=4, do_sample=False, num_return_sequences=2)
    want = _generate(LLAMA, DynamicCache(config=LLAMA.config), ids, **kw)
    got = _generate(LLAMA, _cache(LLAMA, block_size=4), ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=0, atol=1e-4)


def test_sampling_with_seed_equals_dynamic_cache():
    ids = _prompt(2, 9, seed=2)
    kw = dict(do_sample=True, num_return_sequences=3, top_k=0)
    want = _generate(LLAMA, DynamicCache(config=LLAMA.config), ids, seed=7, **kw)
    _assert_same(_generate(LLAMA, _cache(LLAMA, block_size=8), ids, seed=7, **kw), want)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])
def test_other_architectures_greedy(arch):
    model = random_model(arch)
    ids = _prompt(2, 11, seed=3)
    want = _generate(model, DynamicCache(config=model.config), ids, do_sample=False)
    _assert_same(_generate(model, _cache(model, block_size=4), ids, do_sample=False), want)


def test_beams_share_a_prefilled_prompt():
    """8 beams over a 2k-token prompt prefilled once: the blocks are shared, not copied 8 times."""
    model = random_model("llama", num_attention_heads=2, num_key_value_heads=1, hidden_size=32, intermediate_size=32)
    ids = _prompt(1, 2048, seed=4)
    cache = _cache(model, max_tokens=2200, block_size=16)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], past_key_values=cache)
    kw = dict(num_beams=8, do_sample=False, max_new_tokens=6, pad_token_id=0)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **kw)
    dyn = DynamicCache(config=model.config)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=dyn, **kw)
    assert torch.equal(got, want)
    dyn_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dyn.layers)
    assert dyn.layers[0].keys.shape[0] == 8
    ours = cache.peak_blocks_in_use * cache.bytes_per_block
    assert ours * 6 <= dyn_bytes, (cache.peak_blocks_in_use, ours, dyn_bytes)


def test_dynamic_ntk_is_refused():
    config = random_config("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic NTK"):
        ManifoldCache(config, max_batch_size=1, max_tokens=16)


@pytest.mark.parametrize("arch,rotary_dim,interleaved", [
    ("llama", 16, False), ("gpt_neox", 4, False), ("gptj", 8, True), ("phi", 8, False),
])
def test_rope_layout_from_config(arch, rotary_dim, interleaved):
    spec = rope_from_config(random_config(arch))
    assert (spec.rotary_dim, spec.interleaved) == (rotary_dim, interleaved)


def test_unequal_view_lengths_are_refused():
    cache = _cache(LLAMA, block_size=4)
    with torch.no_grad():
        LLAMA(input_ids=_prompt(2, 8), past_key_values=cache)
    cache.delete(1, 0, 4)
    with pytest.raises(ValueError, match=r"same view length, got lengths \[8, 4\]"):
        LLAMA(input_ids=_prompt(2, 1), past_key_values=cache)
