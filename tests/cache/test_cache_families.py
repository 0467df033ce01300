"""Model families whose layers differ: sliding windows, per-layer-type RoPE bases, NoPE layers no flag marks,
soft-capped scores, attention sinks, half-width cos tables.

Each tiny model (4 layers) generates what DynamicCache does, and after an unaligned delete its next steps
equal an independent reference: a DynamicCache of the prompt with the span cut out of every layer and the
later keys re-rotated back by the span with the model's own `apply_rotary_pos_emb` and rotary module, in the
layers that apply RoPE according to a table written from reading each modeling file (not from the cache's
probe).  The gauge backend gives the same logits as eager (sites it cannot prove stay as they were).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import transformers
from transformers import DynamicCache

from gaugecompile.backend import gauge_backend
from gaugecompile.cache import ManifoldCache

SW = ["sliding_attention", "full_attention"] * 2
# model_type -> (attention implementation, dtype, config overrides, which layers apply RoPE, per the modeling code)
FAMILIES = {
    # local layers rotate with rope_local_base_freq, global ones with rope_theta (two bases)
    "gemma3_text": ("sdpa", torch.float64, dict(sliding_window=6, layer_types=SW), [True] * 4),
    # `if self.sliding_window is not None: apply_rotary_pos_emb(...)`: the full layer has no RoPE
    "cohere2": ("sdpa", torch.float64, dict(sliding_window=6), [True, True, True, False]),
    # tanh soft-capping of the scores, alternating windows
    "gemma2": ("eager", torch.float64, dict(sliding_window=6), [True] * 4),
    # learned sink logits, a cos table of one entry per pair, experts (float32 only)
    "gpt_oss": ("eager", torch.float32, dict(sliding_window=6, num_local_experts=4, num_experts_per_tok=2), [True] * 4),
    # every layer sliding
    "mistral": ("sdpa", torch.float64, dict(sliding_window=6), [True] * 4),
}
START, END = 2, 5


def _model(family: str):
    attn, dtype, overrides, _ = FAMILIES[family]
    config = transformers.AutoConfig.for_model(
        family, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **overrides)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _cache(model) -> ManifoldCache:
    return ManifoldCache(model.config, max_batch_size=2, max_tokens=128, block_size=4, kv_dtype=model.dtype)


PROMPT = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))


def _cut_reference(model, family: str) -> DynamicCache:
    """The prompt's DynamicCache with [START, END) cut and the later keys of RoPE layers rotated by START - END
    through the model's own rotary module and apply_rotary_pos_emb."""
    module = importlib.import_module(type(model).__module__)
    full = DynamicCache()
    with torch.no_grad():
        model(input_ids=PROMPT, past_key_values=full, use_cache=True)
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 1, model.config.head_dim, dtype=model.dtype)
    shift = torch.tensor([[START - END]])
    edited = DynamicCache()
    for i, layer in enumerate(full.layers):
        k, v = layer.keys, layer.values
        later = k[:, :, END:]
        if FAMILIES[family][3][i]:
            types = getattr(model.config, "layer_types", None)
            cos, sin = rotary(x, shift, types[i]) if family == "gemma3_text" else rotary(x, shift)
            # a rotation only: the tables carry YaRN's attention factor (GPT-OSS), which a stored key already has
            scale = getattr(rotary, f"{types[i]}_attention_scaling" if family == "gemma3_text" else
                            "attention_scaling", 1.0)
            cos, sin = (t.to(k.dtype) / scale for t in (cos, sin))
            later, _ = module.apply_rotary_pos_emb(later, later, cos, sin)
        edited.update(torch.cat([k[:, :, :START], later], 2), torch.cat([v[:, :, :START], v[:, :, END:]], 2), i)
    return edited


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_layer_gets_the_basis_its_code_applies(family):
    model = _model(family)
    cache = _cache(model)
    assert [not r.is_identity for r in cache.layer_ropes] == FAMILIES[family][3]
    kwargs = dict(input_ids=PROMPT, max_new_tokens=8, do_sample=False)
    assert (model.generate(past_key_values=cache, **kwargs).tolist()
            == model.generate(past_key_values=DynamicCache(config=model.config), **kwargs).tolist())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_after_a_delete_every_layer_matches_the_cut_and_re_rotated_reference(family):
    model = _model(family)
    sink: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(gauge_backend, inner="eager", report_sink=sink,
                                                              keep_graphs=True))
    ref = _cut_reference(model, family)
    runs = []
    for m in (model, compiled):
        cache = _cache(model)
        steps = []
        with torch.no_grad():
            m(input_ids=PROMPT, past_key_values=cache, use_cache=True)
            cache.delete(0, START, END)
            for token in (7, 9, 11):  # past the window of 6 and into a copied block
                steps.append(m(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits)
        runs.append(torch.cat(steps, 1))
    with torch.no_grad():
        want = torch.cat([model(input_ids=torch.tensor([[t]]), past_key_values=ref, use_cache=True).logits
                          for t in (7, 9, 11)], 1)
    torch.testing.assert_close(runs[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-6)
    assert any("materialize_kv" in before for _, before, _ in sink)


def test_forms_not_covered_are_refused_at_construction_with_a_reason():
    from gaugecompile.onnx.cache_step import CacheStep

    gemma3 = _model("gemma3_text")
    with pytest.raises(ValueError, match="2 RoPE bases"):  # an exported step takes one basis for every layer
        CacheStep(gemma3, _cache(gemma3).layer_ropes[0])
    with pytest.raises(ValueError, match="2 RoPE bases"):
        assert _cache(gemma3).rope is None  # the property raises: the layers have no single basis
    mistral = _model("mistral")
    with pytest.raises(ValueError, match=r"layers \[0, 1, 2, 3\] have sliding windows"):
        CacheStep(mistral, _cache(mistral).rope)
    cache = _cache(mistral)
    with torch.no_grad():
        mistral(input_ids=PROMPT, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="sliding windows; recompute"):
        cache.recompute(mistral, 0, [(4, PROMPT[:, 4:8])], fraction=1.0)
    mimo = transformers.AutoConfig.for_model("mimo_v2_flash", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, head_dim=16, v_head_dim=8)
    with pytest.raises(ValueError, match="values of width v_head_dim=8 and keys of head_dim=16"):
        ManifoldCache(mimo, max_batch_size=1, max_tokens=16)


@pytest.mark.parametrize("family", ["mistral", "cohere2", "gemma3_text", "gemma2", "gpt_oss"])
def test_sliding_layers_past_the_window_run_the_windowed_op_on_the_pool(family, monkeypatch):
    """Compiled decode steps past the window, after a delete: every layer is rewritten (Gemma 2's soft-capped and
    GPT-OSS's sink-logit eager attention too), and at run time each sliding layer's mask is read as the window of 6
    (the rotated-query op over the pool, no gather), no layer's as anything but a (windowed) causal mask; the logits
    are eager's."""
    from gaugecompile.ops import masked_attention

    model = _model(family)
    sink: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(gauge_backend, inner="eager", report_sink=sink))
    windows, gathers = [], []
    read = masked_attention.sliding_window_of
    monkeypatch.setattr(masked_attention, "sliding_window_of", lambda *a: windows.append(read(*a)) or windows[-1])
    gather = masked_attention.materialize_views
    monkeypatch.setattr(masked_attention, "materialize_views", lambda *a: gathers.append(1) or gather(*a))
    runs = []
    for m in (model, compiled):
        cache = _cache(model)
        with torch.no_grad():
            m(input_ids=PROMPT, past_key_values=cache, use_cache=True)
            cache.delete(0, START, END)
            windows.clear()
            runs.append(torch.cat([m(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits
                                   for t in (7, 9, 11)], 1))
    tol = 1e-6 if model.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(runs[1], runs[0], rtol=tol, atol=tol)
    # full layers take the masked op only where their mask is not proven causal at compile time
    assert windows.count(6) == sum(_cache(model).is_sliding) * 3 and set(windows) <= {0, 6}
    assert not gathers
    decode = [r for r, *_ in sink if r.rewritten][-1]
    assert len(decode.rewritten) == 4 and not decode.refused


def test_bases_read_from_forms_beyond_apply_rotary_pos_emb():
    """Llama 4's complex form (interleaved pairs, its NoPE layers by flag), Gemma 4's wide global heads with a
    proportional basis of their own, Jamba's attention with no rotary code at all (every layer NoPE, per the probe)."""
    from gaugecompile.cache.rope_config import kv_shape_from_config, layer_ropes_from_config
    from gaugecompile.models.sweep import tiny_config

    llama4 = layer_ropes_from_config(tiny_config("llama4_text"))
    assert [r.is_identity for r in llama4] == [False, False, False, True]
    assert all(r.interleaved for r in llama4 if not r.is_identity)
    gemma4 = tiny_config("gemma4_text")
    assert kv_shape_from_config(gemma4).head_dims == (16, 16, 16, 512)
    ropes = layer_ropes_from_config(gemma4)
    # "proportional": frequencies over the whole head, zero past its rotated quarter (those pairs never turn)
    assert ropes[0].rotary_dim == 16 and ropes[3].rotary_dim == 512
    assert int((ropes[3].inv_freq != 0).sum()) == 64
    jamba = tiny_config("jamba")
    assert kv_shape_from_config(jamba).kinds == ("state", "attention") * 2
    assert all(r.is_identity for r in layer_ropes_from_config(jamba))
