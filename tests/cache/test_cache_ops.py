"""Each ManifoldCache operation against an independently built re-rotating reference (tiny Llama, float32;
`tests/rerotated_reference.py`).  Next-token logits must agree within 1e-4."""

import pytest
import torch
from rerotated_reference import RerotatedReference as Ref

from gaugecompile.cache import ManifoldCache
from gaugecompile.models import random_model

BS = 4
MODEL = random_model("llama")
ATOL = 1e-4


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _step(cache: ManifoldCache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return MODEL(input_ids=ids, past_key_values=cache).logits


def _new_cache(**kw) -> ManifoldCache:
    return ManifoldCache(MODEL.config, max_batch_size=4, max_tokens=kw.pop("max_tokens", 256), block_size=BS, **kw)


def _decode_both(cache, ref, steps: int, seed: int) -> None:
    for i, tok in enumerate(_ids(steps, seed)[0]):
        got, want = _step(cache, tok.view(1, 1))[0, -1], ref.step(tok.view(1, 1))[-1]
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=f"step {i}")


@pytest.mark.parametrize("start,end", [(8, 16), (5, 13), (18, 23), (0, 4)])
def test_delete_matches_rerotated_reference(start, end):
    cache, ref = _new_cache(), Ref(MODEL)
    prompt = _ids(23, 1)
    torch.testing.assert_close(_step(cache, prompt)[0], ref.step(prompt), rtol=0, atol=ATOL)
    cache.delete(0, start, end)
    ref.delete(start, end)
    assert cache.positions(0) == [p for p, _, _ in ref.toks]
    _decode_both(cache, ref, 4, seed=2)


@pytest.mark.parametrize("at", [8, 12, 10**6, 2**30])
def test_splice_prefilled_chunk(at):
    cache, ref = _new_cache(), Ref(MODEL)
    prompt, doc = _ids(16, 3), _ids(8, 4)
    _step(cache, prompt)
    ref.step(prompt)
    chunk = cache.prefill(MODEL, doc)
    doc_ref = Ref(MODEL)
    doc_ref.step(doc)
    cache.splice(0, chunk, at)
    ref.splice(doc_ref.chunk(0, 8), 8, at)
    chunk.free()
    assert cache.positions(0) == [p for p, _, _ in ref.toks]
    _decode_both(cache, ref, 5, seed=5)


def test_splice_chunk_of_another_sequence_and_free_all():
    cache = _new_cache()
    a, b = _ids(12, 6), _ids(12, 7)
    _step(cache, torch.cat([a, b]))
    refs = [Ref(MODEL), Ref(MODEL)]
    refs[0].step(a)
    refs[1].step(b)
    chunk = cache.chunk(1, 4, 8)
    cache.set_batch([0])
    cache.splice(0, chunk, 4)
    refs[0].splice(refs[1].chunk(4, 8), 4, 4)
    chunk.free()
    _decode_both(cache, refs[0], 3, seed=8)
    cache.free(0)
    cache.free(1)
    assert cache.blocks_in_use == 0


def test_set_window_streaming_over_three_windows():
    sink, window = 4, 8
    cache, ref = _new_cache(max_tokens=64), Ref(MODEL)
    cache.set_window(sink, window)
    prompt = _ids(6, 9)
    _step(cache, prompt)
    ref.step(prompt)
    for i, tok in enumerate(_ids(3 * window + 6, 10)[0]):
        # StreamingLLM at block granularity, as documented in set_window
        n = len(ref.toks)
        recent = n - -(-sink // BS) * BS
        evict = max(0, (recent - window) // BS) if recent > 0 else 0
        keep_from = -(-sink // BS) * BS
        kept = ref.toks[:keep_from] + ref.toks[keep_from + evict * BS:]
        ref.toks = [(j, k, v) for j, (_, k, v) in enumerate(kept)]
        ref.next = len(kept)
        assert cache.positions(0) == list(range(len(kept))), i
        got, want = _step(cache, tok.view(1, 1))[0, -1], ref.step(tok.view(1, 1))[-1]
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=f"step {i}")
    assert cache.seq_len(0) <= -(-sink // BS) * BS + window + BS
    assert cache.blocks_in_use <= -(-sink // BS) + window // BS + 2


def test_fork_then_divergent_decoding():
    cache, ref = _new_cache(), Ref(MODEL)
    prompt = _ids(10, 11)  # partial last block: forks must copy it on write
    _step(cache, prompt)
    ref.step(prompt)
    kids = cache.fork(0, 2)
    assert cache.batch == (0, *kids)
    refs = [ref, ref.copy(), ref.copy()]
    for step in range(4):
        toks = _ids(3, 20 + step).view(3, 1)
        got = _step(cache, toks)[:, -1]
        for row in range(3):
            want = refs[row].step(toks[row:row + 1])[-1]
            torch.testing.assert_close(got[row], want, rtol=0, atol=ATOL, msg=f"step {step} row {row}")


def test_reorder_shares_blocks():
    cache = _new_cache()
    prompts = torch.cat([_ids(9, 30), _ids(9, 31), _ids(9, 32)])
    _step(cache, prompts)
    refs = []
    for row in range(3):
        refs.append(Ref(MODEL))
        refs[-1].step(prompts[row:row + 1])
    cache.reorder(torch.tensor([2, 0, 0]))
    refs = [refs[2].copy(), refs[0].copy(), refs[0].copy()]
    for step in range(3):
        toks = _ids(3, 40 + step).view(3, 1)
        got = _step(cache, toks)[:, -1]
        for row in range(3):
            torch.testing.assert_close(got[row], refs[row].step(toks[row:row + 1])[-1], rtol=0, atol=ATOL)
