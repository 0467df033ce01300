"""Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-lite, ...): transformers' `update(latent, k_rot)`
caches a latent (one head, never rotated) and a decoupled RoPE key (one head); ManifoldCache packs them in one
pool row [k_rot | latent] and re-rotates only the RoPE part after an edit.

The reference is written from the model's own code, independently of the cache: the prompt's DynamicCache with
the span cut out of both tensors and the later RoPE keys rotated back by the span with the modeling module's
`apply_rotary_pos_emb` (the stored keys' pair layout, also where the model rotates with its interleave variant).
"""

import importlib

import pytest
import torch
from transformers import DynamicCache

from gaugecompile.cache import ManifoldCache
from gaugecompile.models.sweep import _build, tiny_config

TYPES = ("deepseek_v3", "minicpm3")
START, END = 2, 5
_MODELS: dict = {}


def _model(model_type: str):
    if model_type not in _MODELS:
        _MODELS[model_type] = _build(tiny_config(model_type))
    return _MODELS[model_type]


def _cache(model) -> ManifoldCache:
    return ManifoldCache(model.config, max_batch_size=3, max_tokens=128, block_size=4)


PROMPT = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))


def _cut_reference(model) -> DynamicCache:
    module = importlib.import_module(type(model).__module__)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=PROMPT, past_key_values=full, use_cache=True)
    rotary = model.model.rotary_emb
    cos, sin = rotary(torch.zeros(1, 1, 1, model.config.qk_rope_head_dim), torch.tensor([[START - END]]))
    scale = getattr(rotary, "attention_scaling", 1.0)
    edited = DynamicCache(config=model.config)
    for i, layer in enumerate(full.layers):
        latent, k_rot = layer.keys, layer.values
        later, _ = module.apply_rotary_pos_emb(k_rot[:, :, END:], k_rot[:, :, END:], cos / scale, sin / scale)
        edited.update(torch.cat([latent[:, :, :START], latent[:, :, END:]], 2),
                      torch.cat([k_rot[:, :, :START], later], 2), i)
    return edited


@pytest.mark.parametrize("model_type", TYPES)
def test_latent_and_rope_key_share_one_packed_pool(model_type):
    model = _model(model_type)
    cache = _cache(model)
    rope, rank = cache.shape.latent_dims[0]
    assert (rope, rank) == (model.config.qk_rope_head_dim, model.config.kv_lora_rank)
    with torch.no_grad():
        model(input_ids=PROMPT, past_key_values=cache, use_cache=True)
    assert cache.k_pools[0].shape[2:] == (1, rope + rank) and cache.v_pools[0] is cache.k_pools[0]
    assert cache.layer_ropes[0].rotary_dim == rope  # the latent dims never turn
    assert cache.bytes_per_block == cache.shape.num_layers * 4 * (rope + rank) * 4  # counted once, float32


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_matches_transformers_own_cache(model_type, beams):
    model = _model(model_type)
    kwargs = dict(input_ids=PROMPT, max_new_tokens=6, do_sample=False, num_beams=beams)
    assert (model.generate(past_key_values=_cache(model), **kwargs).tolist()
            == model.generate(past_key_values=DynamicCache(config=model.config), **kwargs).tolist())


@pytest.mark.parametrize("model_type", TYPES)
def test_after_a_delete_only_the_rope_keys_are_re_rotated(model_type):
    model = _model(model_type)
    cache, ref = _cache(model), _cut_reference(model)
    with torch.no_grad():
        model(input_ids=PROMPT, past_key_values=cache, use_cache=True)
        cache.delete(0, START, END)
        got = torch.cat([model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits
                         for t in (7, 9, 11)], 1)
        want = torch.cat([model(input_ids=torch.tensor([[t]]), past_key_values=ref, use_cache=True).logits
                          for t in (7, 9, 11)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_latent_updates_are_checked_and_unsupported_operations_refused():
    model = _model("deepseek_v3")
    cache = _cache(model)
    rope, rank = cache.shape.latent_dims[0]
    with pytest.raises(ValueError, match=rf"key_states: layer 0 caches multi-head latent attention, expected "
                                         rf"\[batch, 1, q_len, {rank}\] \(the latent\)"):
        cache.update(torch.zeros(1, 1, 2, rope), torch.zeros(1, 1, 2, rope), 0)
    with pytest.raises(ValueError, match=rf"value_states: .* \[batch, 1, q_len, {rope}\] \(the RoPE key\)"):
        cache.update(torch.zeros(1, 1, 2, rank), torch.zeros(1, 1, 2, rank), 0)
    with torch.no_grad():
        model(input_ids=PROMPT, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"layers \[0, 1, 2, 3\] cache multi-head latent attention; recompute"):
        cache.recompute(model, 0, [(4, PROMPT[:, 4:8])])
    from gaugecompile.onnx.cache_step import CacheStep

    with pytest.raises(ValueError, match="are not plain attention layers"):
        CacheStep(model, cache.layer_ropes[0])
