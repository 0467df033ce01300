"""torch.compile(backend="gauge") on transformers models from small random configs: parity with eager
for prefill and decode with DynamicCache, and ManifoldCache sites all rewritten."""

import functools

import pytest
import torch
import transformers

from gaugecompile.backend import gauge_backend
from gaugecompile.cache.rope_config import kv_shape_from_config
from gaugecompile.models.random_configs import ARCHITECTURES, random_model


def _run(model, inner, ids, steps=2):
    """Prefill + `steps` decode tokens through a DynamicCache; returns logits and the pass reports."""
    sink = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(gauge_backend, inner=inner, report_sink=sink),
                             dynamic=False)
    outs = []
    with torch.no_grad():
        for fn in (model, compiled):
            cache = transformers.DynamicCache(config=model.config)
            out = fn(ids, past_key_values=cache, use_cache=True)
            logits = [out.logits]
            for step in range(steps):
                out = fn(ids[:, step : step + 1], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits)
            outs.append(logits)
    return outs, sink


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dynamic_cache_parity(arch):
    model = random_model(arch)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    (eager, compiled), sink = _run(model, "eager", ids, steps=1)  # Inductor is covered in test_passes_sites
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    sites = [s for r, _, _ in sink for s in r.rewritten + r.refused]
    decode = [s for s in sites if "cat" in s.gather]  # the decode graph: one cat-with-past site per attention layer
    assert len(decode) == len(kv_shape_from_config(model.config).attention_layers)
    assert all(s.rewritten or s.reason for s in sites)


def _manifold_run(fn, model, ids, steps):
    from gaugecompile.cache import ManifoldCache

    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=64, block_size=4)
    cache.new_sequences(1)  # rows known before the first layer: the bookkeeping graph break falls before the layers
    with torch.no_grad():
        logits = [fn(input_ids=ids, past_key_values=cache, use_cache=True).logits]
        for _ in range(steps):
            logits.append(fn(input_ids=logits[-1][:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits)
    return logits


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gptj"])
def test_manifold_cache_every_layer_rewritten(arch):
    """Prefill + decode through ManifoldCache: every layer's materialize_kv + attention becomes one rotated-query
    op (count == layers in each graph), nothing of the gather / re-rotation is left, and logits equal eager."""
    model = random_model(arch)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    sink = []
    torch._dynamo.reset()
    backend = functools.partial(gauge_backend, inner="eager", report_sink=sink, keep_graphs=True)
    compiled = torch.compile(model, backend=backend)
    ref, got = _manifold_run(model, model, ids, 2), _manifold_run(compiled, model, ids, 2)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    site_graphs = [(r, after) for r, before, after in sink if "materialize_kv" in before]
    assert len(site_graphs) >= 2  # the prefill graph and the decode graph (decode steps share one graph)
    for report, after in site_graphs:
        assert not report.refused, [s.describe() for s in report.refused]
        assert len(report.rewritten) == model.config.num_hidden_layers
        assert "materialize_kv" not in after and "index_select" not in after
        assert after.count("gauge.rotated_query_attention") == model.config.num_hidden_layers


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_gptj_runtime_mask_fast_when_causal_exact_when_padded(inner):
    """GPT-J's eager attention adds a mask built in another graph (the cache's bookkeeping breaks the frame that
    builds it), so each site becomes the masked op: an all-ones attention_mask runs the rotated-query path, a padded
    one masked attention over the view, and both equal eager.  Under Inductor the chain's softmax arrives
    decomposed (amax, exp, sum, div) and is matched in that form."""
    from gaugecompile.cache import ManifoldCache

    model = random_model("gptj")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    sink = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=functools.partial(gauge_backend, inner=inner, report_sink=sink))

    def prefill(fn, mask):
        cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=64, block_size=4)
        cache.new_sequences(1)
        with torch.no_grad():
            return fn(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits

    ones = torch.ones(1, 6, dtype=torch.long)
    padded = ones.clone()
    padded[0, 0] = 0
    for mask in (ones, padded):
        torch.testing.assert_close(prefill(compiled, mask), prefill(model, mask), atol=1e-4, rtol=1e-4)
    rewritten = [s for r, _, _ in sink for s in r.rewritten]
    assert len(rewritten) == model.config.n_layer and all(s.assumes.startswith("mask == causal") for s in rewritten)


def test_generate_with_fresh_manifold_cache_rewrites_every_layer():
    """`generate()` on a fresh ManifoldCache (no new_sequences call), with its all-ones attention_mask: the cache
    assumes one row at the first forward, so the bookkeeping break falls before the layers and each compiled graph
    holds every layer's site; the mask arrives as an input and is checked at run time.  Tokens equal eager."""
    from gaugecompile.cache import ManifoldCache

    model = random_model("llama")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))

    def generate(m):
        cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=64, block_size=4)
        return m.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                          do_sample=False)

    want = generate(model)
    sink = []
    torch._dynamo.reset()
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend=functools.partial(gauge_backend, inner="eager",
                                                                           report_sink=sink, keep_graphs=True))
    try:
        got = generate(model)
    finally:
        model.forward = eager_forward
    assert torch.equal(got, want)
    site_graphs = [r for r, before, _ in sink if "materialize_kv" in before]
    assert len(site_graphs) >= 2
    assert all(len(r.rewritten) == model.config.num_hidden_layers and not r.refused for r in site_graphs)
