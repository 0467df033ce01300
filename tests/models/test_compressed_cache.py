"""Models over compressed KV pools (`ManifoldCache(model, kv_dtype=...)`), as users run them: `generate()` with the
model compiled with `backend="gauge"`, one prompt and a padded batch of unequal prompts, float32 and bfloat16 models,
then an edit.

The reference is the same model over the same kind of cache eagerly (materialize_kv dequantizes the view, SDPA
attends over it); the compiled run's kernel reads the codes and scales in place.  Both attend over the same values,
so logits agree within float rounding of the model's dtype and greedy choices are equal (a tie in that dtype
excepted); this needs bit-identical keys, so the compiled graphs run on eager kernels after the gauge passes
(`inner="eager"`).  Under Inductor the model's own arithmetic is fused differently, keys differ in their last bits,
and a key on a rounding boundary of the grid gets the neighbouring code (one step of its group's scale): that
comparison has a tolerance of a few such steps' effect.  Every layer is rewritten and runs the kernel, never the
fallback.
"""

from __future__ import annotations

import pytest
import torch
from greedy_choices import assert_same_choices, generate_with_logits

from gaugecompile.cache import ManifoldCache
from gaugecompile.kv_format import kv_format
from gaugecompile.models import random_model
from gaugecompile.models.random_configs import random_config
from gaugecompile.ops.counters import runs

pytestmark = pytest.mark.usefixtures("fresh_compile")

ATOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}
EAGER_KERNELS = {"inner": "eager"}  # the passes, then the graph on eager kernels: bit-identical keys
CASES = [("int8", torch.float32), ("float8_e4m3fn", torch.float32), ("int4", torch.float32),
         ("bfloat16", torch.float32), ("int8", torch.bfloat16), ("int4", torch.bfloat16)]


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, kv_dtype: str, **kw) -> ManifoldCache:
    return ManifoldCache(model, max_batch_size=4, max_tokens=256, block_size=4, kv_dtype=kv_dtype, **kw)


def _model(dtype: torch.dtype):
    return random_model("llama", dtype=dtype)


def _check_kernel_ran() -> None:
    assert runs["kernel"] > 0 and runs["masked_fallback"] == 0, dict(runs)


@pytest.mark.parametrize(("kv_dtype", "dtype"), CASES, ids=[f"{k}-pools-{str(d)[6:]}-model" for k, d in CASES])
def test_generate_over_compressed_pools_equals_eager(kv_dtype, dtype):
    model = _model(dtype)
    ids = _ids(11, 0)
    want, want_logits = generate_with_logits(model, _cache(model, kv_dtype), ids, max_new_tokens=6)
    runs.clear()
    model.compile(backend="gauge", options=EAGER_KERNELS)
    cache = _cache(model, kv_dtype)
    got, got_logits = generate_with_logits(model, cache, ids, max_new_tokens=6)
    _check_kernel_ran()
    assert_same_choices(want_logits, got_logits, ATOL[dtype])
    assert cache.k_pools[0].dtype == kv_format(kv_dtype).storage
    if torch.equal(want_logits.argmax(-1), got_logits.argmax(-1)):
        assert torch.equal(want, got)


def test_inductor_over_int8_pools():
    """The default compile (Inductor): the same greedy tokens, logits within a few codes' effect (see above)."""
    model = _model(torch.float32)
    ids = _ids(11, 0)
    _, want_logits = generate_with_logits(model, _cache(model, "int8"), ids, max_new_tokens=6)
    runs.clear()
    model.compile(backend="gauge")
    _, got_logits = generate_with_logits(model, _cache(model, "int8"), ids, max_new_tokens=6)
    _check_kernel_ran()
    assert_same_choices(want_logits, got_logits, 1e-2)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_padded_batch_of_unequal_prompts_over_compressed_pools(kv_dtype):
    """Left-padded prompts of unequal lengths through generate(): the masked op's fast path reads the codes."""
    model = _model(torch.float32)
    prompts = [_ids(9, 1)[0], _ids(4, 2)[0], _ids(13, 3)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()

    def run():
        out = model.generate(ids, attention_mask=mask, past_key_values=_cache(model, kv_dtype), do_sample=False,
                             max_new_tokens=5, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.logits, 1).float()

    want = run()
    runs.clear()
    model.compile(backend="gauge", options=EAGER_KERNELS)
    got = run()
    _check_kernel_ran()
    for row in range(len(prompts)):
        assert_same_choices(want[row], got[row], ATOL[torch.float32])


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_an_edit_then_decode_over_compressed_pools(kv_dtype):
    """Delete a span and splice a chunk at a far position, then decode: compiled equals eager over the same edits,
    and the edit copied no byte it did not have to (no re-quantization to check: stored rows are never rewritten)."""
    model = _model(torch.float32)

    def run():
        cache = _cache(model, kv_dtype)
        seq = cache.new_sequences(1)[0]
        cache.set_batch([seq])
        ids = _ids(14, 4)
        model(ids, past_key_values=cache, use_cache=True)
        chunk = cache.chunk(seq, 2, 7)
        cache.delete(seq, 3, 9)
        cache.splice(seq, chunk, 10**6)
        token, logits = _ids(1, 5), []
        with torch.no_grad():  # greedy by hand: the cache holds more than the ids generate() would be given
            for _ in range(5):
                logits.append(model(input_ids=token, past_key_values=cache).logits[0, -1].float())
                token = logits[-1].argmax().view(1, 1)
        return torch.stack(logits)

    want = run()
    runs.clear()
    model.compile(backend="gauge", options=EAGER_KERNELS)
    got = run()
    _check_kernel_ran()
    assert_same_choices(want, got, ATOL[torch.float32])


def test_memory_per_token_scales_included():
    """Bytes a token takes over the pools, scales included, against float32 pools (head dim 64, as SmolLM2)."""
    model = random_model("llama", head_dim=64, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    per_block = {}
    for kv_dtype in ("float32", "bfloat16", "int8", "float8_e4m3fn", "int4"):
        cache = _cache(model, kv_dtype)
        model(_ids(3, 0), past_key_values=cache, use_cache=True)
        per_block[kv_dtype] = cache.bytes_per_block
    ratio = {k: v / per_block["float32"] for k, v in per_block.items()}
    assert ratio["bfloat16"] == 0.5
    assert ratio["int8"] == ratio["float8_e4m3fn"] == (64 + 2 * 2) / 256 <= 0.27
    assert ratio["int4"] == (32 + 2 * 2) / 256 <= 0.15


def test_bad_kv_dtype_is_refused_before_anything_is_allocated():
    config = random_config("llama")
    for bad in ("int3", torch.int32, "fp8", torch.uint8):
        with pytest.raises(ValueError, match="kv_dtype: expected one of"):
            ManifoldCache(config, max_batch_size=1, max_tokens=8, kv_dtype=bad)


def test_recompute_refuses_compressed_pools():
    model = _model(torch.float32)
    cache = _cache(model, "int8")
    seq = cache.new_sequences(1)[0]
    cache.set_batch([seq])
    model(_ids(8, 0), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="cache: its kv_dtype 'int8' is quantized once"):
        cache.recompute(model, seq, [(2, _ids(2, 1))])


def test_onnx_export_refuses_compressed_pools_with_a_reason():
    from gaugecompile.onnx.cache_step import CacheStep

    model = _model(torch.float32)
    cache = _cache(model, "int8")
    with pytest.raises(ValueError, match="cache: kv_dtype 'int8' pools \\(codes with scales\\) do not export yet"):
        CacheStep.capture(model, cache, _ids(4, 0))
