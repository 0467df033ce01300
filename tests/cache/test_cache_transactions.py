"""ManifoldCache as a transaction system: a hypothesis state machine over every cache operation.

Operations run against a list-of-tokens model: per sequence, (token id, logical position) in view order
and the next logical position.  Each token gets a random unrotated key and the value `t`; forwards go
through `update()` layer by layer with keys rotated at the view length (what a transformers model
does).  Rules include failing operations (out-of-range arguments, a full pool, a KeyboardInterrupt in the
middle of a block copy) and interrupted forwards (layers 0..k of 3, then nothing): after a failure the
whole state -- tables, refcounts, free list, batch, view length, window -- must equal what it was before,
and after every step each view must hold exactly the model's tokens, every key rotated to its logical
position in the frame of the next query.  Freeing everything at the end must leave no block in use.

The same machine runs over compressed pools (int8, float8, int4: `CompressedCacheMachine`), where it also checks
the contract that makes them worth having: no edit ever changes a stored byte.  Every slot a view reads holds,
codes and scales bit for bit, what `kv_format.quantize` made of its token when it was written, whatever deletes,
splices, windows, reorders, forks and frees came since (a copy-on-write copy is bytes as they are).
"""


import pytest
import torch
from cache_state import WindowSpy, snapshot, windowed
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gaugecompile import materialize_kv
from gaugecompile.cache import CachePoolFullError, ManifoldCache
from gaugecompile.kv_format import dequantize, quantize
from gaugecompile.models.random_configs import random_config

BS = 4
LAYERS = 3
CONFIG = random_config("llama", num_hidden_layers=LAYERS)
FAILURES = (ValueError, CachePoolFullError, KeyboardInterrupt)


def _key(t: int, heads: int, dim: int) -> torch.Tensor:
    return torch.randn(heads, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7919 + t))


class _Interrupt:
    """Raise KeyboardInterrupt from the cache's next block copy (a Ctrl-C in the middle of an edit)."""

    def __init__(self, cache: ManifoldCache) -> None:
        self.storage, self.original = cache.storage, cache.storage.copy_blocks

    def __enter__(self):
        def interrupted(targets):
            if targets:
                raise KeyboardInterrupt
            return self.original(targets)

        self.storage.copy_blocks = interrupted

    def __exit__(self, *exc) -> None:
        self.storage.copy_blocks = self.original


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


class CacheMachine(RuleBasedStateMachine):
    KV_DTYPE: str = "float64"

    def __init__(self) -> None:
        super().__init__()
        self.cache = ManifoldCache(CONFIG, max_batch_size=6, max_tokens=120, block_size=BS, kv_dtype=self.KV_DTYPE)
        #: per token: the rows written for it (key codes, key scales, value codes, value scales) and the view
        #: position its key was rotated at
        self.written: dict[int, tuple[tuple, int]] = {}
        self.spy = WindowSpy(self.cache)
        self.heads, self.dim = CONFIG.num_key_value_heads, self.cache.shape.head_dim
        self.toks: dict[int, list[tuple[int, int]]] = {}
        self.next: dict[int, int] = {}
        self.window: tuple[int, int] | None = None
        self.chunks: list = []
        self.counter = 0
        self.failures = 0

    # ------------------------------------------------------------------ helpers
    def _attempt(self, op, interrupt: bool = False) -> bool:
        """Run `op`; on an expected failure check that nothing changed.  True when it succeeded."""
        before = snapshot(self.cache)
        try:
            if interrupt:
                with _Interrupt(self.cache):
                    op()
            else:
                op()
        except FAILURES:
            self.failures += 1
            assert snapshot(self.cache) == before
            return False
        return True

    def _live(self, i: int) -> int | None:
        live = sorted(self.toks)
        return live[i % len(live)] if live else None

    def _apply_window(self, seq: int) -> None:
        self.toks[seq] = windowed(self.toks[seq], *self.window, self.spy.counts[seq])
        self.next[seq] = len(self.toks[seq])

    # ------------------------------------------------------------------ rules
    @initialize(q=st.integers(1, 14), forks=st.integers(0, 2), chunk=st.integers(0, 10))
    def start(self, q, forks, chunk):
        """A prefilled sequence, some forks of it and a chunk, so that every rule has something to act on."""
        self.forward(rows=1, q=q, layers=LAYERS, pick=0)
        self.fork(pick=0, n=forks)
        self.take_chunk(pick=0, a=chunk, b=chunk + 5)

    @rule(rows=st.integers(1, 3), q=st.integers(1, 6), layers=st.sampled_from([LAYERS, LAYERS, 1]),
          pick=st.integers(0, 99))
    def decode(self, rows, q, layers, pick):
        """Forwards again (most rules edit; this keeps the views growing)."""
        self.forward(rows, q, layers, pick)

    @rule(rows=st.integers(1, 3), q=st.integers(1, 6), layers=st.integers(0, LAYERS), pick=st.integers(0, 99),
          interrupt=st.booleans())
    def forward(self, rows, q, layers, pick, interrupt=False, settle=True):
        """A forward over sequences of one view length; `layers < 3` is a forward interrupted after them (rolled
        back by the next accessor, or with `settle=False` left for the next forward to find)."""
        cache = self.cache
        batch = []
        if self.toks:
            first = self._live(pick)
            same = [s for s in sorted(self.toks) if len(self.toks[s]) == len(self.toks[first])]
            batch = [first] + [s for s in same if s != first][: rows - 1]
            if batch != cache.host.batch:
                cache.set_batch(batch)
        view = cache.get_seq_length()
        n_rows = len(batch) or 1
        ids = [[self.counter + r * q + i for i in range(q)] for r in range(n_rows)]
        keys = torch.stack([torch.stack([cache.rope.apply(_key(t, self.heads, self.dim), torch.tensor([view + i]))
                                         for i, t in enumerate(row)], 1) for row in ids])
        vals = torch.stack([torch.stack([torch.full((self.heads, self.dim), float(t), dtype=torch.float64)
                                         for t in row], 1) for row in ids])
        before = snapshot(cache)
        try:
            with _Interrupt(cache) if interrupt else _Nothing():
                for layer in range(layers):
                    cache.update(keys, vals, layer)
        except FAILURES:
            self.failures += 1
            assert snapshot(cache) == before
            return
        if layers < LAYERS:  # interrupted after `layers` layers
            if settle:
                assert cache.sequences is not None  # any accessor settles it
                assert snapshot(cache) == before
            return
        self.counter += n_rows * q
        fmt = cache.kv_format
        for r, row in enumerate(ids):
            for i, t in enumerate(row):
                self.written[t] = (quantize(keys[r, :, i], fmt) + quantize(vals[r, :, i], fmt), view + i)
        batch = list(cache.batch)
        for seq, row in zip(batch, ids, strict=True):
            self.toks.setdefault(seq, [])
            self.next.setdefault(seq, 0)
            self.toks[seq] = self.toks[seq] + [(t, self.next[seq] + i) for i, t in enumerate(row)]
            self.next[seq] += q
            if self.window is not None:
                self._apply_window(seq)

    @rule(pick=st.integers(0, 99), n=st.integers(0, 3))
    def fork(self, pick, n):
        seq = self._live(pick)
        if seq is None:
            return
        result = []
        if self._attempt(lambda: result.extend(self.cache.fork(seq, n))):
            for new in result:
                self.toks[new], self.next[new] = list(self.toks[seq]), self.next[seq]

    @rule(pick=st.integers(0, 99), a=st.integers(-2, 40), b=st.integers(0, 40), interrupt=st.booleans())
    def delete(self, pick, a, b, interrupt):
        seq = self._live(pick)
        if seq is None:
            return
        start, end = (a, b) if a < 0 else sorted((a, b))
        if self._attempt(lambda: self.cache.delete(seq, start, end), interrupt):
            self.toks[seq] = [(t, p if p < start else p - (end - start)) for t, p in self.toks[seq]
                              if not start <= p < end]
            n = self.next[seq]
            self.next[seq] = n - (end - start) if n >= end else min(n, start)

    @rule(pick=st.integers(0, 99), a=st.integers(0, 30), b=st.integers(0, 30))
    def take_chunk(self, pick, a, b):
        seq = self._live(pick)
        if seq is None or len(self.chunks) >= 3:
            return
        start, end = sorted((a, b))
        chunk = self.cache.chunk(seq, start, end)
        self.chunks.append((chunk, [(t, p - start) for t, p in self.toks[seq] if start <= p < end], end - start))

    @rule(pick=st.integers(0, 99), which=st.integers(0, 2), at=st.integers(0, 40),
          far=st.sampled_from([None, 2**20, 2**31 - 200, 2**31, 2**62, 2**63, -1]), interrupt=st.booleans())
    def splice(self, pick, which, at, far, interrupt):
        seq = self._live(pick)
        if seq is None or not self.chunks:
            return
        chunk, inside, span = self.chunks[which % len(self.chunks)]
        at = at if far is None else far
        if self._attempt(lambda: self.cache.splice(seq, chunk, at), interrupt):
            moved = [(t, p if p < at else p + span) for t, p in self.toks[seq]]
            self.toks[seq] = sorted(moved + [(t, p + at) for t, p in inside], key=lambda tp: tp[1])
            n = self.next[seq]
            self.next[seq] = at + span if at >= n else n + span

    @rule(which=st.integers(0, 2))
    def free_chunk(self, which):
        if self.chunks:
            chunk, _, _ = self.chunks.pop(which % len(self.chunks))
            chunk.free()

    @rule(pick=st.integers(0, 99), shift=st.integers(0, 5))
    def reorder(self, pick, shift):
        first = self._live(pick)
        if first is None:
            return
        batch = [s for s in sorted(self.toks) if len(self.toks[s]) == len(self.toks[first])][:4]
        self.cache.set_batch(batch)
        idx = [(i * 2 + shift) % len(batch) for i in range(len(batch))]
        if self._attempt(lambda: self.cache.reorder(idx)):
            new = {s: (list(self.toks[batch[i]]), self.next[batch[i]]) for s, i in zip(batch, idx, strict=True)}
            for s, (toks, n) in new.items():
                self.toks[s], self.next[s] = toks, n

    @rule(bad=st.sampled_from([[9], [-1], [0, 0, 0, 0, 0, 0, 0]]))
    def reorder_out_of_range(self, bad):
        self._attempt(lambda: self.cache.reorder(bad))

    @rule(pick=st.integers(0, 99))
    def free(self, pick):
        seq = self._live(pick)
        if seq is not None and len(self.toks) > 1:
            self.cache.free(seq)
            del self.toks[seq], self.next[seq]

    @rule(sink=st.integers(-1, 9), window=st.one_of(st.none(), st.integers(0, 24)), interrupt=st.booleans())
    def set_window(self, sink, window, interrupt):
        if self._attempt(lambda: self.cache.set_window(sink, window), interrupt):
            self.window = None if window is None else (sink, window)
            for seq in self.toks if window is not None else ():
                self._apply_window(seq)

    @rule(pick=st.integers(0, 99), n=st.integers(0, 12))
    def crop(self, pick, n):
        seq = self._live(pick)
        if seq is None:
            return
        self.cache.set_batch([seq])
        if self._attempt(lambda: self.cache.crop(-n)):
            if n:  # crop = delete from the n-th last token's position to the next position
                cut = self.toks[seq][len(self.toks[seq]) - n][1]
                self.toks[seq] = [(t, p) for t, p in self.toks[seq] if p < cut]
                self.next[seq] = cut

    @precondition(lambda self: self.toks)
    @rule(bad=st.sampled_from(["layer", "heads", "dim", "q0", "rows"]))
    def update_with_wrong_kv(self, bad):
        """K/V that do not fit the pools are refused before the cache changes."""
        cache = self.cache
        k = torch.zeros(1, self.heads, 1, self.dim, dtype=torch.float64)
        layer = 0
        if bad == "layer":
            layer = LAYERS
        elif bad == "heads":
            k = torch.zeros(1, self.heads + 1, 1, self.dim, dtype=torch.float64)
        elif bad == "dim":
            k = torch.zeros(1, self.heads, 1, self.dim * 2, dtype=torch.float64)
        elif bad == "q0":
            k = torch.zeros(1, self.heads, 0, self.dim, dtype=torch.float64)
        else:
            k = torch.zeros(cache.max_batch_size + 1, self.heads, 1, self.dim, dtype=torch.float64)
        self._attempt(lambda: cache.update(k, k, layer))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def views_match_the_token_lists(self):
        cache = self.cache
        assert sorted(cache.sequences) == sorted(self.toks)
        assert cache.window == self.window
        for s, toks in self.toks.items():
            assert cache.positions(s) == [p for _, p in toks]
            assert cache.next_position(s) == self.next[s]
            if not toks:
                continue
            blocks, deltas, counts = cache.mapping(s)
            layer = len(toks) % LAYERS
            k, v = materialize_kv(cache.k_pools[layer], cache.v_pools[layer], torch.tensor([blocks]),
                                  torch.tensor([deltas]), cache.rope, len(toks), torch.tensor([counts]),
                                  k_scale=cache.storage.k_scales[layer], v_scale=cache.storage.v_scales[layer],
                                  dtype=torch.float64)
            if not cache.kv_format.scaled:
                assert v[0, 0, :, 0].tolist() == [float(t) for t, _ in toks]
                want = torch.stack([cache.rope.apply(_key(t, self.heads, self.dim),
                                                     torch.tensor([p - self.next[s] + len(toks)])) for t, p in toks], 1)
                torch.testing.assert_close(k[0], want, rtol=0, atol=1e-9)
                continue
            # compressed: the view is the written rows dequantized, each key rotated from where it was written to its
            # view position (float32 arithmetic)
            rows = [self.written[t] for t, _ in toks]
            want_v = torch.stack([dequantize(w[0][2], w[0][3]) for w in rows], 1).double()
            want_k = torch.stack([cache.rope.apply(dequantize(w[0][0], w[0][1]).double(),
                                                   torch.tensor([p - self.next[s] + len(toks) - w[1]]))
                                  for w, (_, p) in zip(rows, toks, strict=True)], 1)
            torch.testing.assert_close(v[0], want_v, rtol=0, atol=0)
            torch.testing.assert_close(k[0], want_k, rtol=1e-5, atol=1e-5)

    @invariant()
    def stored_rows_are_as_written(self):
        """No edit changes a stored byte: every slot a view reads holds its token's rows as first written."""
        cache, storage = self.cache, self.cache.storage
        for s, toks in self.toks.items():
            blocks, _, counts = cache.mapping(s)
            slots = [b * BS + j for b, n in zip(blocks, counts, strict=True) for j in range(n)]
            assert len(slots) == len(toks)
            for layer in range(LAYERS) if toks else ():
                stored = [storage.k_pools[layer], storage.k_scales[layer], storage.v_pools[layer],
                          storage.v_scales[layer]]
                for slot, (t, _) in zip(slots, toks, strict=True):
                    for have, want in zip(stored, self.written[t][0], strict=True):
                        if have is None:
                            continue
                        row = have.view(-1, *have.shape[2:])[slot]
                        assert torch.equal(row.view(torch.uint8), want.view(torch.uint8)), (s, t, layer)

    def teardown(self):
        for chunk, _, _ in self.chunks:
            chunk.free()
        self.cache.reset()
        assert self.cache.blocks_in_use == 0 and not self.cache.allocator.refcount.any()
        assert sorted(self.cache.allocator.free_list) == list(range(self.cache.num_blocks))


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=120, stateful_step_count=30, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


class CompressedCacheMachine(CacheMachine):
    KV_DTYPE = "int8"


class Float8CacheMachine(CacheMachine):
    KV_DTYPE = "float8_e4m3fn"


class Int4CacheMachine(CacheMachine):
    KV_DTYPE = "int4"


_COMPRESSED_SETTINGS = settings(max_examples=30, stateful_step_count=30, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
TestCompressedCacheMachine = CompressedCacheMachine.TestCase
TestCompressedCacheMachine.settings = _COMPRESSED_SETTINGS
TestFloat8CacheMachine = Float8CacheMachine.TestCase
TestFloat8CacheMachine.settings = _COMPRESSED_SETTINGS
TestInt4CacheMachine = Int4CacheMachine.TestCase
TestInt4CacheMachine.settings = _COMPRESSED_SETTINGS


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_interrupted_forward_is_rolled_back_by_the_next_forward(layers):
    """Finding 1: a forward that stops between layers leaves nothing behind; the next forward is exact."""
    machine = CacheMachine()
    machine.forward(rows=1, q=5, layers=LAYERS, pick=0)
    machine.forward(rows=1, q=3, layers=layers, pick=0, settle=False)
    machine.forward(rows=1, q=2, layers=LAYERS, pick=0)
    machine.views_match_the_token_lists()
    machine.teardown()
