"""`ManifoldCache.recompute`: selective recompute of a spliced chunk's KV in its new context (issue 18).

Exact where it must be: recomputing every token from the splice point on is a re-prefill of the whole
prompt; recomputing none is the plain splice; blocks other sequences or chunks share keep their KV; a
failure changes nothing.  The "deviation" policy picks the tokens a full recompute changes most at the
probe layer."""

import pytest
import torch
from cache_state import snapshot

from gaugecompile.cache import CachePoolFullError, ManifoldCache
from gaugecompile.models.random_configs import random_model

MODEL = random_model("llama", num_hidden_layers=3, dtype=torch.float64)
VOCAB = MODEL.config.vocab_size
GEN = torch.Generator().manual_seed(0)
PREFIX, DOC, SUFFIX, NEW = (torch.randint(0, VOCAB, (1, n), generator=GEN) for n in (9, 7, 5, 3))


def _spliced(suffix: bool = False, max_tokens: int = 128) -> ManifoldCache:
    """PREFIX (+ SUFFIX) prefilled together, DOC prefilled alone and spliced after PREFIX."""
    cache = ManifoldCache(MODEL.config, max_batch_size=2, max_tokens=max_tokens, block_size=4, kv_dtype=torch.float64)
    with torch.no_grad():
        MODEL(input_ids=torch.cat([PREFIX, SUFFIX], 1) if suffix else PREFIX, past_key_values=cache, use_cache=True)
    chunk = cache.prefill(MODEL, DOC)
    cache.splice(0, chunk, PREFIX.shape[1])
    chunk.free()
    return cache


def _next_logits(cache: ManifoldCache) -> torch.Tensor:
    with torch.no_grad():
        return MODEL(input_ids=NEW, past_key_values=cache, use_cache=True).logits


def _reprefilled(*parts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return MODEL(input_ids=torch.cat([*parts, NEW], 1)).logits[:, -NEW.shape[1]:]


def test_recomputing_every_token_of_a_chunk_at_the_end_is_a_reprefill():
    cache = _spliced()
    assert cache.recompute(MODEL, 0, [(9, DOC)], fraction=1.0) == list(range(9, 16))
    torch.testing.assert_close(_next_logits(cache), _reprefilled(PREFIX, DOC), rtol=0, atol=1e-10)


def test_recomputing_the_chunk_and_what_follows_it_is_a_reprefill():
    cache = _spliced(suffix=True)
    cache.recompute(MODEL, 0, [(9, DOC), (16, SUFFIX)], fraction=1.0)
    torch.testing.assert_close(_next_logits(cache), _reprefilled(PREFIX, DOC, SUFFIX), rtol=0, atol=1e-10)


@pytest.mark.parametrize("policy", ["first", "deviation"])
def test_recomputing_nothing_is_the_plain_splice(policy):
    cache = _spliced()
    before = snapshot(cache)
    assert cache.recompute(MODEL, 0, [(9, DOC)], fraction=0.0, policy=policy) == []
    assert snapshot(cache) == before
    plain = _spliced()
    torch.testing.assert_close(_next_logits(cache), _next_logits(plain), rtol=0, atol=0)


def test_a_partial_recompute_moves_toward_the_reprefill_and_keeps_shared_blocks():
    cache = _spliced()
    (fork,) = cache.fork(0, 1)
    chunk = cache.chunk(0, 9, 16)  # another holder of the spliced blocks
    shared = [p.clone() for p in cache.k_pools]
    plain = float((_next_logits(_spliced()) - _reprefilled(PREFIX, DOC)).abs().max())
    cache.set_batch([0])
    assert cache.recompute(MODEL, 0, [(9, DOC)], fraction=3 / 7) == [9, 10, 11]
    cache.set_batch([0])
    partial = float((_next_logits(cache) - _reprefilled(PREFIX, DOC)).abs().max())
    assert partial < plain
    for before, after, phys in zip(shared, cache.k_pools, [chunk.pieces.phys] * len(shared), strict=True):
        assert torch.equal(before[phys], after[phys])  # the chunk's blocks (and the fork's) were copied, not written
    assert cache.mapping(fork)[0] != cache.mapping(0)[0]
    chunk.free()


def test_the_deviation_policy_picks_what_a_full_recompute_changes_most_at_the_probe_layer():
    probe = 1
    full = _spliced()
    before = full.k_pools[probe].clone(), full.v_pools[probe].clone()
    blocks_before = full.mapping(0)
    full.recompute(MODEL, 0, [(9, DOC)], fraction=1.0)
    blocks_after = full.mapping(0)
    bs = full.block_size

    def kv(pools, mapping, view_index):
        blocks, _, counts = mapping
        entry, offset = 0, view_index
        while offset >= counts[entry]:
            offset, entry = offset - counts[entry], entry + 1
        return pools[0].view(-1, *pools[0].shape[2:])[blocks[entry] * bs + offset], \
            pools[1].view(-1, *pools[1].shape[2:])[blocks[entry] * bs + offset]

    after = full.k_pools[probe], full.v_pools[probe]
    change = []
    for i in range(7):
        (k0, v0), (k1, v1) = kv(before, blocks_before, 9 + i), kv(after, blocks_after, 9 + i)
        change.append(float(((k1 - k0) ** 2).sum() + ((v1 - v0) ** 2).sum()))
    want = sorted(sorted(range(7), key=lambda i: -change[i])[:3])
    got = _spliced().recompute(MODEL, 0, [(9, DOC)], fraction=3 / 7, policy="deviation", probe_layer=probe)
    assert got == [9 + i for i in want]


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=1.5), "fraction: expected a number in"),
    (dict(fraction=True), "fraction: expected a number in"),
    (dict(policy="random"), "policy: expected one of"),
    (dict(probe_layer=3, policy="deviation", fraction=0.5), r"probe_layer: expected an int in \[0, 3\)"),
    (dict(policy="deviation", fraction=0.5, start=12), r"spans\[0\]: sequence 0 holds 4"),
    (dict(start=12), r"spans\[0\]: sequence 0 holds 4 of the 7 logical positions \[12, 19\)"),
    (dict(spans=[(9, DOC), (10, DOC[:, :2])]), "spans: expected spans that do not overlap"),
    (dict(spans=(9, DOC)), "spans: expected a non-empty list"),
    (dict(spans=[(9, DOC.float())]), r"spans\[0\]: expected a \(start, input_ids"),
])
def test_bad_arguments_change_nothing(kwargs, match):
    cache = _spliced()
    before = snapshot(cache)
    spans = kwargs.pop("spans", [(kwargs.pop("start", 9), DOC)])
    with pytest.raises(ValueError, match=match):
        cache.recompute(MODEL, 0, spans, **kwargs)
    assert snapshot(cache) == before


def test_a_full_pool_or_a_failing_layer_changes_nothing():
    cache = _spliced(max_tokens=16)
    before = snapshot(cache)
    with pytest.raises(CachePoolFullError):
        cache.recompute(MODEL, 0, [(9, DOC)], fraction=1.0)
    assert snapshot(cache) == before
    cache = _spliced()
    before, pools = snapshot(cache), [p.clone() for p in cache.k_pools]
    layer = MODEL.model.layers[2].mlp
    hook = layer.register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.recompute(MODEL, 0, [(9, DOC)], fraction=1.0)
    finally:
        hook.remove()
    assert snapshot(cache) == before
    blocks = cache.mapping(0)[0]
    for old, new in zip(pools, cache.k_pools, strict=True):
        assert torch.equal(old[blocks], new[blocks])


def test_budgets_are_per_span_and_all_spans_run_in_one_forward():
    cache = _spliced(suffix=True)
    forwards = []
    hook = MODEL.model.layers[0].register_forward_hook(lambda *_: forwards.append(1))
    try:
        got = cache.recompute(MODEL, 0, [(9, DOC), (16, SUFFIX)], fraction=0.4)
    finally:
        hook.remove()
    assert got == [9, 10, 11, 16, 17] and len(forwards) == 1  # round(0.4 * 7) and round(0.4 * 5) first tokens


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt_neox", "gptj", "phi"])
def test_every_family_recomputes_to_the_reprefill(arch):
    """Rotate-half, interleaved and partial rotary: the chosen tokens' keys land in their blocks' frame."""
    model = random_model(arch, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    prefix, doc, new = (torch.randint(0, model.config.vocab_size, (1, n), generator=gen) for n in (9, 7, 3))
    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=128, block_size=4, kv_dtype=torch.float64)
    with torch.no_grad():
        model(input_ids=prefix, past_key_values=cache, use_cache=True)
    chunk = cache.prefill(model, doc)
    cache.splice(0, chunk, 9)
    chunk.free()
    cache.recompute(model, 0, [(9, doc)], fraction=1.0)
    with torch.no_grad():
        got = model(input_ids=new, past_key_values=cache, use_cache=True).logits
        want = model(input_ids=torch.cat([prefix, doc, new], 1)).logits[:, -3:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
