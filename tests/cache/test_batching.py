"""`gaugecompile.batching.generate_batch`: requests join and leave a running batch; each generates what it generates
alone, shared prefixes are prefilled once, the compiled steps run the kernel and stop recompiling, and a failure
leaves the cache as it was."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import GenerationConfig

from gaugecompile import ManifoldCache
from gaugecompile.batching import BatchStats, generate_batch
from gaugecompile.models import random_model
from gaugecompile.ops.counters import runs

LLAMA = random_model("llama")
GREEDY = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None)


def _requests(seed: int, lengths: list[int], header: int = 20) -> list[list[int]]:
    """Prompts of the given lengths; every other one starts with a shared header of `header` tokens."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 128, (header,), generator=g).tolist()
    own = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    return [shared + p if i % 2 else p for i, p in enumerate(own)]


def _alone(prompt: list[int], new_tokens: int = 5) -> list[int]:
    ids = torch.tensor([prompt])
    out = LLAMA.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _state(cache: ManifoldCache):
    return cache.sequences, cache.batch, cache.free_blocks, cache.blocks_in_use


def test_each_request_generates_what_it_generates_alone_and_shares_its_header():
    prompts = _requests(0, [5, 17, 3, 30, 8, 12, 2])
    stats = BatchStats()
    cache = ManifoldCache(LLAMA, max_batch_size=4, max_tokens=400, block_size=4)
    before = _state(cache)
    out = generate_batch(LLAMA, prompts, GREEDY, cache=cache, max_batch_size=3, stats=stats)
    assert list(out) == [f"req_{i}" for i in range(len(prompts))]
    for i, prompt in enumerate(prompts):
        assert out[f"req_{i}"].generated_tokens == _alone(prompt), f"request {i}"
        assert out[f"req_{i}"].prompt_ids == prompt and out[f"req_{i}"].is_finished()
    # the header (20 tokens, in requests 1, 3, 5) is prefilled once; the other two take its blocks
    assert stats.reused_tokens == 2 * 20
    assert stats.prefilled_tokens == sum(map(len, prompts)) - 2 * 20
    assert set(stats.ttft) == set(out) and stats.peak_blocks > 0
    assert _state(cache) == before  # every row and kept prefix freed


def test_without_sharing_every_prompt_is_prefilled():
    prompts = _requests(1, [6, 9, 4])
    stats = BatchStats()
    out = generate_batch(LLAMA, prompts, GREEDY, max_batch_size=2, share_prefixes=False, stats=stats)
    assert stats.reused_tokens == 0 and stats.prefilled_tokens == sum(map(len, prompts))
    assert [o.generated_tokens for o in out.values()] == [_alone(p) for p in prompts]


def test_arrivals_admit_requests_no_earlier_than_they_arrive():
    prompts = _requests(2, [4, 6, 3])
    stats = BatchStats()
    arrivals = [0.0, 0.0, 0.3]
    out = generate_batch(LLAMA, prompts, GREEDY, arrivals=arrivals, stats=stats)
    assert stats.ttft["req_2"] >= 0.3
    assert [o.generated_tokens for o in out.values()] == [_alone(p) for p in prompts]


def test_compiled_steps_run_the_kernel_and_stop_recompiling():
    model = random_model("llama")
    model.compile(backend="gauge", options={"inner": "eager"}, dynamic=True)
    cache = ManifoldCache(model, max_batch_size=4, max_tokens=600, block_size=4)
    graphs = []
    for seed, lengths in enumerate([[5, 17, 3, 30, 8], [9, 2, 25, 4], [7, 7, 40, 11, 3, 6], [13, 6, 2], [50, 1, 9]]):
        prompts = _requests(seed, lengths)
        runs.clear()
        before = counters["stats"]["unique_graphs"]
        out = generate_batch(model, prompts, GREEDY, cache=cache, max_batch_size=3)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        assert runs["masked_fallback"] == 0 and runs["kernel"] > 0
        if seed in (0, 3):
            assert [o.generated_tokens for o in out.values()] == [_alone(p) for p in prompts]
    assert graphs[3:] == [0, 0], graphs  # after the first batch shapes, no recompile


def test_a_request_that_cannot_fit_is_refused_naming_it_with_the_cache_unchanged():
    cache = ManifoldCache(LLAMA, max_batch_size=4, max_tokens=40, block_size=4)
    before = _state(cache)
    with pytest.raises(ValueError, match="inputs: request 1 needs"):
        generate_batch(LLAMA, [[5, 6, 7], list(range(3, 60))], GREEDY, cache=cache)
    assert _state(cache) == before


def test_a_forward_that_fails_mid_run_leaves_the_cache_as_it_was():
    """A failure in a joiner's prefill (after its row was opened and took a shared prefix) frees every row and kept
    prefix the call made."""
    calls = []

    def failing(**kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second joiner's prefill: both rows opened, neither decoding yet
            raise RuntimeError("model failed")
        return LLAMA(**kwargs)

    cache = ManifoldCache(LLAMA, max_batch_size=4, max_tokens=400, block_size=4)
    before = _state(cache)
    with pytest.raises(RuntimeError, match="model failed"):
        generate_batch(failing, _requests(4, [5, 7, 3, 6]), GREEDY, cache=cache, max_batch_size=2)
    assert _state(cache) == before


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(inputs=[]), "inputs"), (dict(inputs=[[1], []]), "inputs"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(arrivals=[1.0, 0.5]), "arrivals"), (dict(arrivals=[0.0]), "arrivals"),
])
def test_bad_arguments_are_refused_naming_them(kwargs, match):
    args = dict(inputs=[[3, 4], [5, 6, 7]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_batch(LLAMA, args.pop("inputs"), GREEDY, **args)


def test_a_row_freed_twice_is_refused():
    cache = ManifoldCache(LLAMA, max_batch_size=2, max_tokens=64, block_size=4)
    (seq,) = cache.new_sequences(1)
    cache.free(seq)
    with pytest.raises(ValueError, match="seq: no live sequence"):
        cache.free(seq)
