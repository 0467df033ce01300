"""bfloat16 and float16 models under `backend="gauge"`, however they got there: loaded in the dtype (the rotary
buffer stays float32), cast with `.to(dtype)` or `.half()` (the buffer, and so the model's basis, is rounded).

Each compiled run over a `ManifoldCache(model, ...)` is compared with the same model, in the same dtype, through
transformers' own caches eagerly (or the re-rotating reference for edits, `rerotated_reference.py`).  Logits agree
within the dtype's tolerance and greedy tokens are equal; where a greedy choice differs, the reference's own top
two logits were within that tolerance (a tie in that dtype), never a wrong token.  Every attention layer is
rewritten and runs the kernel (the run-time counters), no fallback.
"""

from __future__ import annotations

import pytest
import torch
from greedy_choices import assert_same_choices, generate_with_logits
from hypothesis import given
from hypothesis import strategies as st
from rerotated_reference import RerotatedReference
from transformers import DynamicCache

from gaugecompile.bench.decode_loops import stream_baseline, stream_gauge
from gaugecompile.cache import ManifoldCache
from gaugecompile.cache.model_basis import follow_model
from gaugecompile.models import random_model
from gaugecompile.ops.counters import runs
from gaugecompile.rope import RopeSpec, rounded_from

ATOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
#: How each model got its dtype: loaded in it, or cast after (which rounds the rotary buffer).
HOW = {
    "llama-bf16-loaded": lambda: random_model("llama", dtype=torch.bfloat16),
    "llama-bf16-cast": lambda: random_model("llama").to(torch.bfloat16),
    "llama-fp16-half": lambda: random_model("llama").half(),
    "neox-bf16-cast": lambda: random_model("gpt_neox").to(torch.bfloat16),
}


pytestmark = pytest.mark.usefixtures("fresh_compile")


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _compiled(model, sink: list) -> torch.nn.Module:
    model.compile(backend="gauge", options={"report_sink": sink})
    return model


def _assert_rewritten(sink: list, layers: int) -> None:
    """Every compiled graph with attention sites rewrote all `layers` of them, refused none; the kernel ran."""
    site_reports = [r for r, _, _ in sink if r.rewritten or r.refused]
    assert site_reports, "no graph with an attention site was compiled"
    for report in site_reports:
        assert not report.refused, [s.describe() for s in report.refused]
        assert len(report.rewritten) == layers
    assert runs["kernel"] > 0 and runs["masked_fallback"] == 0, dict(runs)


@pytest.mark.parametrize("how", list(HOW))
def test_greedy_equals_dynamic_cache_in_the_same_dtype(how):
    model = HOW[how]()
    ids = _ids(9, 0)
    want_seq, want = generate_with_logits(model, DynamicCache(config=model.config), ids, max_new_tokens=8)
    sink: list = []
    cache = ManifoldCache(model, max_batch_size=1, max_tokens=64, block_size=4)
    assert cache.kv_format.storage == model.dtype  # the cast model's dtype, not its config's
    got_seq, got = generate_with_logits(_compiled(model, sink), cache, ids, max_new_tokens=8)
    _assert_rewritten(sink, model.config.num_hidden_layers)
    assert_same_choices(want, got, ATOL[model.dtype])
    if torch.equal(got.argmax(-1), want.argmax(-1)):
        assert torch.equal(got_seq, want_seq)


def test_beams_equal_dynamic_cache_in_bfloat16():
    model = random_model("llama", seed=3).to(torch.bfloat16)
    ids = _ids(7, 1)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, attention_mask=torch.ones_like(ids))
    want = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    sink: list = []
    cache = ManifoldCache(model, max_batch_size=3, max_tokens=128, block_size=4)
    got = _compiled(model, sink).generate(ids, past_key_values=cache, **kw)
    _assert_rewritten(sink, model.config.num_hidden_layers)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streaming_equals_the_rerotating_sink_cache(dtype):
    """StreamingLLM (4 sinks, a window of 12, block-granular) teacher-forced over 48 tokens: the compiled step over
    ManifoldCache against the re-rotating sink cache evicting the same tokens, both in `dtype`."""
    model = random_model("llama", seed=4).to(dtype)
    ids = _ids(48, 2)
    sink: list = []
    forward = _compiled(model, sink).forward
    cache = ManifoldCache(model, max_batch_size=1, max_tokens=64, block_size=4)
    got, _, lengths = stream_gauge(forward, model, ids, sink=4, window=12, cache=cache, block_size=4)
    torch._dynamo.reset()
    model.forward = model._orig_mod.forward if hasattr(model, "_orig_mod") else model.forward
    want, _ = stream_baseline(model, ids, sink=4, window=12, lengths=lengths, block_size=4)
    assert max(lengths) < ids.shape[1]  # tokens were evicted: later keys sit at shifted positions
    assert_same_choices(want, got, ATOL[dtype])
    assert runs["kernel"] > 0 and runs["masked_fallback"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_edits_follow_the_cast_models_basis(dtype):
    """A delete, then a document spliced at position 10^6 (a delta of 10^6: the config's unrounded frequencies
    would be off by radians there), decoded compiled, against the re-rotating reference in the model's basis."""
    model = random_model("llama", seed=5).to(dtype)
    cache, ref = ManifoldCache(model, max_batch_size=1, max_tokens=128, block_size=4), RerotatedReference(model)
    prompt, doc = _ids(20, 6), _ids(8, 7)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache)
    ref.step(prompt)
    cache.delete(0, 5, 11)
    ref.delete(5, 11)
    chunk = cache.prefill(model, doc)
    doc_ref = RerotatedReference(model)
    doc_ref.step(doc)
    cache.splice(0, chunk, 10**6)
    ref.splice(doc_ref.chunk(0, 8), 8, 10**6)
    chunk.free()
    sink: list = []
    compiled = torch.compile(model.forward, backend="gauge", options={"report_sink": sink})  # the reference: eager
    got, want = [], []
    with torch.no_grad():
        for tok in _ids(4, 8)[0]:
            got.append(compiled(input_ids=tok.view(1, 1), past_key_values=cache).logits[0, -1])
            want.append(ref.step(tok.view(1, 1))[-1])
    _assert_rewritten(sink, model.config.num_hidden_layers)
    assert_same_choices(torch.stack(want), torch.stack(got), ATOL[dtype])


@given(theta=st.floats(100.0, 1e6), pairs=st.integers(1, 64), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_the_cache_follows_a_rounded_buffer_exactly(theta, pairs, dtype):
    """A buffer holding the config's frequencies rounded to `dtype` (subnormals included) is the model's basis, to
    the last bit; a float32 buffer leaves the config's basis as it is; a buffer 5% off matches nothing."""
    rope = RopeSpec.from_base(theta, 2 * pairs)
    rounded = rope.inv_freq.float().to(dtype)
    assert rounded_from(rounded, rope.inv_freq)
    module = torch.nn.Module()
    module.register_buffer("inv_freq", rounded)
    (followed,) = follow_model(module, (rope,))
    assert torch.equal(followed.inv_freq, rounded.double())
    module.inv_freq = rope.inv_freq.float()
    assert follow_model(module, (rope,)) == (rope,)
    module.inv_freq = (rope.inv_freq * 1.05).to(dtype)
    assert not rounded_from(module.inv_freq, rope.inv_freq)  # (its first frequency, 1.0, is off by 5%)


def test_one_basis_rounded_two_ways_is_refused():
    rope = RopeSpec.from_base(10000.0, 16)
    module = torch.nn.Module()
    module.register_buffer("inv_freq", rope.inv_freq.to(torch.bfloat16))
    module.register_buffer("original_inv_freq", rope.inv_freq.to(torch.float16))
    with pytest.raises(ValueError, match="rounded differently"):
        follow_model(module, (rope,))


def test_a_cache_built_from_the_config_before_a_cast_says_how_to_follow_it():
    """Built from the config of a model cast later, the compiled step refuses at run time, naming the fix."""
    model = random_model("llama")
    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=64, block_size=4, kv_dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    model.compile(backend="gauge")
    with pytest.raises(Exception, match=r"rounded to torch.bfloat16.*ManifoldCache\(model"), torch.no_grad():
        model(input_ids=_ids(5, 9), past_key_values=cache)
    with pytest.raises(ValueError, match=r"ManifoldCache\(model"):
        cache.prefill(model, _ids(4, 9))
