"""ManifoldCache bookkeeping against a list-of-tokens model, without a model forward.

Each token gets a random unrotated key k_t and value t.  Appends go through `update()` with keys
rotated at the view length (what a transformers model does with `get_seq_length()`).  After every
operation, each live sequence's materialised view must hold exactly the model's tokens in order, every
key rotated to its logical position in the frame of the next query, which sits at the view length
(logical - next_logical + view), and no block may leak.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaugecompile import materialize_kv
from gaugecompile.cache import CachePoolFullError, ManifoldCache
from gaugecompile.models.random_configs import random_config

BS = 4
CONFIG = random_config("llama", num_hidden_layers=1)
H, D = 2, 16


def _key(t: int) -> torch.Tensor:
    return torch.randn(H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + t))


class Model:
    """Reference: per sequence a list of (token id, logical position) and the next logical position."""

    def __init__(self) -> None:
        self.seqs: dict[int, list[tuple[int, int]]] = {}
        self.next: dict[int, int] = {}


def _append(cache: ManifoldCache, model: Model, seqs: list[int], q: int, counter: list[int]) -> None:
    cache.set_batch(seqs)
    frame = cache.get_seq_length()
    keys, vals = [], []
    for s in seqs:
        ks, vs = [], []
        for i in range(q):
            t = counter[0]
            counter[0] += 1
            ks.append(cache.rope.apply(_key(t), torch.tensor([frame + i]).expand(H)))
            vs.append(torch.full((H, D), float(t), dtype=torch.float64))
            model.seqs[s].append((t, model.next[s] + i))
        model.next[s] += q
        keys.append(torch.stack(ks, 1))
        vals.append(torch.stack(vs, 1))
    cache.update(torch.stack(keys), torch.stack(vals), 0)


def _check(cache: ManifoldCache, model: Model) -> None:
    assert sorted(cache.host.seqs) == sorted(model.seqs)
    for s, toks in model.seqs.items():
        assert cache.positions(s) == [p for _, p in toks]
        assert cache.next_position(s) == model.next[s]
        if not toks:
            continue
        blocks, deltas, counts = cache.mapping(s)
        k, v = materialize_kv(cache.k_pools[0], cache.v_pools[0], torch.tensor([blocks]), torch.tensor([deltas]),
                              cache.rope, len(toks), torch.tensor([counts]))
        assert v[0, 0, :, 0].tolist() == [float(t) for t, _ in toks]
        for j, (t, p) in enumerate(toks):
            want = cache.rope.apply(_key(t), torch.tensor([p - model.next[s] + len(toks)]).expand(H))
            torch.testing.assert_close(k[0, :, j], want, rtol=0, atol=1e-9)


def _snapshot(cache: ManifoldCache):
    return (
        {s: (m.blocks.tolist(), m.delta.tolist(), m.counts.tolist(), m.length, m.next_logical)
         for s, m in cache.host.seqs.items()},
        cache.free_blocks, cache.get_seq_length(), cache.batch, cache.allocator.refcount.copy().tolist(),
        cache.allocator.free_list, cache.window,
    )


OPS = st.lists(
    st.tuples(
        st.sampled_from(["append", "fork", "delete", "splice", "reorder", "free"]),
        st.integers(0, 7), st.integers(0, 40), st.integers(0, 40), st.integers(0, 7), st.integers(1, 6),
    ),
    min_size=1, max_size=14,
)


@settings(max_examples=60)
@given(first=st.integers(1, 13), ops=OPS)
def test_random_operations_match_token_list(first, ops):
    cache = ManifoldCache(CONFIG, max_batch_size=8, max_tokens=400, block_size=BS, kv_dtype=torch.float64)
    model = Model()
    counter = [0]
    _append_fresh(cache, model, first, counter)
    _check(cache, model)
    for op, a, b, c, d, q in ops:
        live = sorted(model.seqs)
        if not live:
            break
        seq = live[a % len(live)]
        before = _snapshot(cache)
        try:
            if op == "append":
                _append(cache, model, [seq], q, counter)
            elif op == "fork" and len(live) < 6:
                for new in cache.fork(seq, 1 + q % 2):
                    model.seqs[new] = list(model.seqs[seq])
                    model.next[new] = model.next[seq]
            elif op == "delete":
                start, end = sorted((b, c))
                cache.delete(seq, start, end)
                toks = model.seqs[seq]
                model.seqs[seq] = [(t, p if p < start else p - (end - start)) for t, p in toks
                                   if not start <= p < end]
                n = model.next[seq]
                model.next[seq] = n - (end - start) if n >= end else min(n, start)
            elif op == "splice":
                src = live[d % len(live)]
                start, end = sorted((b % 20, c % 20))
                chunk = cache.chunk(src, start, end)
                try:
                    at = b if q != 6 else 10**6
                    cache.splice(seq, chunk, at)
                finally:
                    chunk.free()
                inserted = [(t, p - start + at) for t, p in model.seqs[src] if start <= p < end]
                toks = model.seqs[seq]
                model.seqs[seq] = sorted([(t, p if p < at else p + end - start) for t, p in toks] + inserted,
                                         key=lambda tp: tp[1])
                n = model.next[seq]
                model.next[seq] = at + end - start if at >= n else n + end - start
            elif op == "reorder":
                cache.set_batch(live)
                idx = [(a * i + b) % len(live) for i in range(len(live))]
                new = {s: (list(model.seqs[live[i]]), model.next[live[i]]) for s, i in zip(live, idx, strict=True)}
                cache.reorder(idx)
                for s, (toks, n) in new.items():
                    model.seqs[s], model.next[s] = toks, n
            elif op == "free":
                cache.free(seq)
                del model.seqs[seq], model.next[seq]
        except CachePoolFullError:
            assert _snapshot(cache) == before
        _check(cache, model)
    for s in list(model.seqs):
        cache.free(s)
    assert cache.blocks_in_use == 0 and cache.free_blocks == cache.num_blocks


def _append_fresh(cache, model, q, counter):
    """The first forward of a fresh cache creates its row."""
    frame = cache.get_seq_length()
    ks = torch.stack([cache.rope.apply(_key(i), torch.tensor([frame + i]).expand(H)) for i in range(q)], 1)
    vs = torch.stack([torch.full((H, D), float(i), dtype=torch.float64) for i in range(q)], 1)
    cache.update(ks[None], vs[None], 0)
    counter[0] = q
    (s,) = cache.batch
    model.seqs[s] = [(i, i) for i in range(q)]
    model.next[s] = q


def _delete(cache, model, seq, start, end):
    cache.delete(seq, start, end)
    model.seqs[seq] = [(t, p if p < start else p - (end - start)) for t, p in model.seqs[seq] if not start <= p < end]
    model.next[seq] -= end - start


def test_unaligned_edits_copy_at_most_the_split_block():
    """Issue 14, finding 6: a cut off block boundaries is never refused, and copies only the block it splits
    (entries carry their own token counts), however many tokens come after it."""
    cache = ManifoldCache(CONFIG, max_batch_size=2, max_tokens=400, block_size=BS, kv_dtype=torch.float64)
    model, counter = Model(), [0]
    _append_fresh(cache, model, 60 * BS + 2, counter)
    copied = []
    copy_blocks = cache.storage.copy_blocks
    cache.storage.copy_blocks = lambda targets: (copied.append(len(targets)), copy_blocks(targets))
    _delete(cache, model, 0, 1, 2)  # splits block 0: its tail is copied to a fresh block, nothing after it moves
    _check(cache, model)
    blocks, _, counts = cache.mapping(0)
    assert copied == [1] and counts[:3] == [1, BS - 2, BS] and blocks[2:] == list(range(1, 61))
    _delete(cache, model, 0, BS + 1, 3 * BS)  # from inside one entry to inside another: the right one is copied
    _check(cache, model)
    assert copied == [1, 1]
    entries = len(cache.mapping(0)[0])
    _delete(cache, model, 0, 2, BS + 1)  # from entry boundaries to entry boundaries: no copy
    _check(cache, model)
    assert copied == [1, 1, 0] and len(cache.mapping(0)[0]) < entries
    chunk = cache.chunk(0, 3, 3 * BS + 1)  # a ragged chunk, spliced off block boundaries
    cache.splice(0, chunk, 5 * BS + 3)
    inserted = [(t, p - 3 + 5 * BS + 3) for t, p in model.seqs[0] if 3 <= p < 3 * BS + 1]
    model.seqs[0] = sorted([(t, p if p < 5 * BS + 3 else p + 3 * BS - 2) for t, p in model.seqs[0]] + inserted,
                           key=lambda tp: tp[1])
    model.next[0] += 3 * BS - 2
    chunk.free()
    _check(cache, model)
    assert copied[3:] == [2]  # the chunk's first piece and the block the splice splits


def test_full_pool_raises_before_any_change():
    cache = ManifoldCache(CONFIG, max_batch_size=1, max_tokens=12, block_size=BS, kv_dtype=torch.float64)
    model, counter = Model(), [0]
    _append_fresh(cache, model, 10, counter)
    ids = cache.fork(0, 1)
    model.seqs[ids[0]], model.next[ids[0]] = list(model.seqs[0]), model.next[0]
    cache.set_batch([0])
    before = _snapshot(cache)
    assert cache.free_blocks == 1
    with pytest.raises(CachePoolFullError, match="needs 2 free blocks, 1 of 4"):
        _append(cache, _Scratch(model), [0], 6, [100])
    assert _snapshot(cache) == before
    chunk = cache.chunk(0, 5, 7)
    with pytest.raises(CachePoolFullError, match="needs 2 free blocks"):
        cache.splice(0, chunk, 6)  # two split blocks to copy, one free
    assert _snapshot(cache)[0] == before[0]
    chunk.free()
    assert _snapshot(cache) == before
    _check(cache, model)


class _Scratch(Model):
    """A throw-away copy of a model, for an append that is expected to fail."""

    def __init__(self, model: Model) -> None:
        self.seqs = {s: list(t) for s, t in model.seqs.items()}
        self.next = dict(model.next)
