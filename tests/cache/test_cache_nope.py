"""NoPE layers (SmolLM3's `no_rope_layers`): cached as the model wrote them, never re-rotated by an edit.

The reference is a DynamicCache of the whole prompt with the deleted span cut out of every layer and the later
keys re-rotated back by the span in the RoPE layers only (float64, exact angles).  After an unaligned delete
the next two steps must agree (the second writes into a copied block, the copy that re-rotates keys), eagerly
and compiled with the gauge backend, which rewrites the NoPE layers too (their query carries no rotation; the
op rotates it in a zero basis, the identity).
"""

import functools

import pytest
import torch
import transformers
from transformers import DynamicCache

from gaugecompile.backend import gauge_backend
from gaugecompile.cache import ManifoldCache
from gaugecompile.rope import RopeSpec, delta_cos_sin, rotate

CONFIG = transformers.AutoConfig.for_model(
    "smollm3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
CONFIG._attn_implementation = "sdpa"
torch.manual_seed(0)
MODEL = transformers.AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float64).eval()
PROMPT = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
START, END = 2, 5  # off the block boundaries (block size 4)


def _cache() -> ManifoldCache:
    return ManifoldCache(CONFIG, max_batch_size=2, max_tokens=128, block_size=4, kv_dtype=torch.float64)


def _reference_after_delete() -> DynamicCache:
    full = DynamicCache(config=CONFIG)
    with torch.no_grad():
        MODEL(input_ids=PROMPT, past_key_values=full, use_cache=True)
    rope = RopeSpec(MODEL.model.rotary_emb.inv_freq)
    cos, sin = delta_cos_sin(torch.tensor(START - END), rope.inv_freq, torch.float64)
    edited = DynamicCache(config=CONFIG)
    for i, layer in enumerate(full.layers):
        k, v = layer.keys, layer.values
        later = k[:, :, END:]
        if CONFIG.no_rope_layers[i]:  # a RoPE layer: later keys move back by the span
            later = rotate(later, cos, sin, rope.rotary_dim, rope.interleaved)
        edited.update(torch.cat([k[:, :, :START], later], 2), torch.cat([v[:, :, :START], v[:, :, END:]], 2), i)
    return edited


def test_the_nope_layers_are_read_from_the_config():
    cache = _cache()
    assert CONFIG.no_rope_layers == [1, 0, 1, 0]
    assert [r.is_identity for r in cache.layer_ropes] == [False, True, False, True]
    assert cache.layer_ropes[0] == cache.rope


def test_greedy_generation_equals_dynamic_cache():
    kwargs = dict(input_ids=PROMPT, max_new_tokens=8, do_sample=False)
    got = MODEL.generate(past_key_values=_cache(), **kwargs)
    assert got.tolist() == MODEL.generate(past_key_values=DynamicCache(config=CONFIG), **kwargs).tolist()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "gauge"])
def test_after_a_delete_the_nope_layers_are_not_re_rotated(compiled):
    sink: list = []
    torch._dynamo.reset()
    model = torch.compile(MODEL, backend=functools.partial(gauge_backend, inner="eager", report_sink=sink,
                                                           keep_graphs=True)) if compiled else MODEL
    cache, ref = _cache(), _reference_after_delete()
    with torch.no_grad():
        model(input_ids=PROMPT, past_key_values=cache, use_cache=True)
        cache.delete(0, START, END)
        for token in (7, 9):  # the second step writes into a copy of the partial last block
            got = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
            want = MODEL(input_ids=torch.tensor([[token]]), past_key_values=ref, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    if compiled:
        reports = [r for r, before, _ in sink if "materialize_kv" in before]
        assert reports and all(len(r.rewritten) == CONFIG.num_hidden_layers and not r.refused for r in reports)
        assert {s.rope for r in reports for s in r.rewritten} == {"rotate-half", "none"}


def test_export_refuses_nope_layers_with_a_reason():
    from gaugecompile.onnx.cache_step import CacheStep

    with pytest.raises(ValueError, match=r"layers \[1, 3\] use no RoPE"):
        CacheStep(MODEL, _cache().rope)


def test_recomputing_a_spliced_chunk_is_a_reprefill_with_nope_layers():
    """The recompute path rotates new keys into their blocks' frame in the RoPE layers only."""
    doc = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    cache = _cache()
    with torch.no_grad():
        MODEL(input_ids=PROMPT, past_key_values=cache, use_cache=True)
        chunk = cache.prefill(MODEL, doc)  # stored at positions 0..6, spliced at 10: its RoPE keys are 10 off
        cache.splice(0, chunk, PROMPT.shape[1])
        chunk.free()
        cache.recompute(MODEL, 0, [(PROMPT.shape[1], doc)], fraction=1.0)
        got = MODEL(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits
        want = MODEL(input_ids=torch.cat([PROMPT, doc, torch.tensor([[7]])], 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
