"""ManifoldCache under a real transformers model: next-token logits against a DynamicCache re-prefilled from
scratch, generation after edits, and a regression test for each finding of issue 14.

A one-layer model makes the re-prefill an exact reference: a token's K/V then depend only on the token and
its position, so the cache's edited view equals a DynamicCache prefilled with the view's tokens at their
logical positions, whatever edits made it.  The model computes its RoPE angles in float32 (transformers
does, whatever the dtype), the cache re-rotates with exact ones: logits agree to ~1e-9, hence atol 1e-6.
"""

import copy

import pytest
import torch
from cache_state import WindowSpy, snapshot, windowed
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from transformers import DynamicCache

from gaugecompile.cache import CachePoolFullError, ManifoldCache
from gaugecompile.cache.host import HostState
from gaugecompile.models.random_configs import random_config, random_model

MODEL = random_model("llama", num_hidden_layers=1, dtype=torch.float64)
VOCAB = MODEL.config.vocab_size


def _cache(model=MODEL, **kw) -> ManifoldCache:
    kw = dict(max_batch_size=4, max_tokens=160, block_size=4) | kw
    return ManifoldCache(model.config, kv_dtype=torch.float64, **kw)


def _reference_logits(model, toks: list[tuple[int, int]], new: list[int], next_pos: int) -> torch.Tensor:
    """Logits of `new` after a DynamicCache prefilled with `toks` (token, logical position) from scratch."""
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        if toks:
            model(input_ids=torch.tensor([[t for t, _ in toks]]), position_ids=torch.tensor([[p for _, p in toks]]),
                  past_key_values=ref, use_cache=True)
        out = model(input_ids=torch.tensor([new]), position_ids=torch.tensor([range(next_pos, next_pos + len(new))]),
                    past_key_values=ref, use_cache=True)
    return out.logits[0]


class _Raise:
    """Make `module`'s forward raise `exc` (a failure or a Ctrl-C inside a forward)."""

    def __init__(self, module: torch.nn.Module, exc: BaseException) -> None:
        self.module, self.exc = module, exc

    def __enter__(self):
        def hook(*_):
            raise self.exc

        self.handle = self.module.register_forward_pre_hook(hook)

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class ModelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = _cache()
        self.spy = WindowSpy(self.cache)
        self.toks: dict[int, list[tuple[int, int]]] = {}
        self.next: dict[int, int] = {}
        self.window: tuple[int, int] | None = None
        self.gen = torch.Generator().manual_seed(0)

    def _ids(self, n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=self.gen).tolist()

    def _step(self, seqs: list[int], q: int) -> None:
        new = [self._ids(q) for _ in seqs]
        self.cache.set_batch(seqs)
        with torch.no_grad():
            logits = MODEL(input_ids=torch.tensor(new), past_key_values=self.cache, use_cache=True).logits
        for row, seq in enumerate(seqs):
            want = _reference_logits(MODEL, self.toks[seq], new[row], self.next[seq])
            torch.testing.assert_close(logits[row], want, rtol=0, atol=1e-6)
            self._append(seq, new[row])

    def _append(self, seq: int, ids: list[int]) -> None:
        self.toks[seq] = self.toks[seq] + [(t, self.next[seq] + i) for i, t in enumerate(ids)]
        self.next[seq] += len(ids)
        if self.window is not None:
            self._apply_window(seq)

    def _apply_window(self, seq: int) -> None:
        self.toks[seq] = windowed(self.toks[seq], *self.window, self.spy.counts[seq])
        self.next[seq] = len(self.toks[seq])

    def _rows(self, pick: int, rows: int) -> list[int]:
        live = sorted(self.toks)
        first = live[pick % len(live)]
        return [first] + [s for s in live if s != first and len(self.toks[s]) == len(self.toks[first])][: rows - 1]

    @initialize(n=st.integers(1, 12))
    def prompt(self, n):
        (seq,) = self.cache.new_sequences(1)
        self.toks[seq], self.next[seq] = [], 0
        self._step([seq], n)

    @rule(pick=st.integers(0, 99), rows=st.integers(1, 3), q=st.integers(1, 3))
    def step(self, pick, rows, q):
        self._step(self._rows(pick, rows), q)

    @rule(pick=st.integers(0, 99), q=st.integers(1, 3),
          exc=st.sampled_from([RuntimeError("boom"), KeyboardInterrupt()]), where=st.sampled_from(["k", "mlp"]))
    def failed_step(self, pick, q, exc, where):
        """A forward that raises inside the layer (after its tokens were placed) changes nothing."""
        seq = self._rows(pick, 1)[0]
        self.cache.set_batch([seq])
        layer = MODEL.model.layers[0]
        module = layer.self_attn.k_proj if where == "k" else MODEL.model.norm
        before, ids = snapshot(self.cache), self._ids(q)
        with _Raise(module, exc), pytest.raises(type(exc)), torch.no_grad():
            MODEL(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        if where == "k":  # before the layer's update: the forward is pending, the next call rolls it back
            assert self.cache.seq_len(seq) == len(self.toks[seq])
            assert snapshot(self.cache) == before
        else:  # after the last layer (the final norm): the forward has committed, as a completed forward
            self._append(seq, ids)

    @rule(pick=st.integers(0, 99), a=st.integers(0, 30), b=st.integers(0, 30))
    def delete(self, pick, a, b):
        seq = self._rows(pick, 1)[0]
        start, end = sorted((a, b))
        self.cache.delete(seq, start, end)
        self.toks[seq] = [(t, p if p < start else p - (end - start)) for t, p in self.toks[seq] if not start <= p < end]
        n = self.next[seq]
        self.next[seq] = n - (end - start) if n >= end else min(n, start)

    @rule(pick=st.integers(0, 99), n=st.integers(1, 9), at=st.integers(0, 40))
    def splice_document(self, pick, n, at):
        seq = self._rows(pick, 1)[0]
        doc = self._ids(n)
        try:
            chunk = self.cache.prefill(MODEL, torch.tensor([doc]))
        except CachePoolFullError:
            return
        try:
            self.cache.splice(seq, chunk, at)
        except CachePoolFullError:
            return
        finally:
            chunk.free()
        moved = [(t, p if p < at else p + n) for t, p in self.toks[seq]]
        self.toks[seq] = sorted(moved + [(t, at + i) for i, t in enumerate(doc)], key=lambda tp: tp[1])
        self.next[seq] = at + n if at >= self.next[seq] else self.next[seq] + n

    @rule(pick=st.integers(0, 99))
    def fork(self, pick):
        if len(self.toks) < 4:
            seq = self._rows(pick, 1)[0]
            (new,) = self.cache.fork(seq, 1)
            self.toks[new], self.next[new] = list(self.toks[seq]), self.next[seq]

    @rule(pick=st.integers(0, 99))
    def free(self, pick):
        if len(self.toks) > 1:
            seq = self._rows(pick, 1)[0]
            self.cache.free(seq)
            del self.toks[seq], self.next[seq]

    @rule(sink=st.integers(0, 6), window=st.one_of(st.none(), st.integers(4, 20)))
    def set_window(self, sink, window):
        self.cache.set_window(sink, window)
        self.window = None if window is None else (sink, window)
        for seq in self.toks if window is not None else ():
            self._apply_window(seq)

    @invariant()
    def views_hold_the_tokens(self):
        for seq, toks in self.toks.items():
            assert self.cache.positions(seq) == [p for _, p in toks]

    def teardown(self):
        self.cache.reset()
        assert self.cache.blocks_in_use == 0


TestModelMachine = ModelMachine.TestCase
TestModelMachine.settings = settings(max_examples=25, stateful_step_count=12, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- generate() after edits (finding 3)
def _view_ids(cache: ManifoldCache, toks: list[int], seq: int = 0) -> list[int]:
    """The token ids of the view, given the token of each logical position before the edit."""
    return [toks[p] for p in cache.positions(seq)]


@pytest.mark.parametrize("edit", ["delete", "splice", "set_window"])
def test_generate_continues_after_an_edit(edit):
    """`generate(input_ids=<the view's ids> + new ids, past_key_values=cache)` -- what a transformers user writes
    for a prefix cache -- gives the text a model generates on the view's ids from scratch."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 30), generator=gen)
    cache = _cache()
    with torch.no_grad():
        MODEL(input_ids=prompt, past_key_values=cache, use_cache=True)
    text = prompt[0].tolist()
    if edit == "delete":
        cache.delete(0, 5, 13)
        view = text[:5] + text[13:]
    elif edit == "splice":
        doc = torch.randint(0, VOCAB, (1, 7), generator=gen)
        chunk = cache.prefill(MODEL, doc)
        cache.splice(0, chunk, 9)
        chunk.free()
        view = text[:9] + doc[0].tolist() + text[9:]
    else:  # the policy applied once, then off: generation goes on over the windowed view
        cache.set_window(4, 10)
        cache.set_window(0, None)
        view = [text[p] for p in range(30) if p < 4 or p >= 20]  # 4 sink tokens, 4 blocks evicted, 10 recent
    assert cache.get_seq_length() == len(view)
    new = torch.randint(0, VOCAB, (1, 3), generator=gen)
    ids = torch.cat([torch.tensor([view]), new], 1)
    out = MODEL.generate(input_ids=ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    want = MODEL.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert out.tolist() == want.tolist()


# ---------------------------------------------------------------------- regression tests, one per finding
def _prefilled(n: int = 10, model=MODEL, **kw) -> ManifoldCache:
    cache = _cache(model, **kw)
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)),
              past_key_values=cache, use_cache=True)
    return cache


def test_finding_1_empty_input_is_refused_before_any_change():
    cache = _prefilled()
    before = snapshot(cache)
    with pytest.raises(ValueError, match="at least one new token"):
        cache.get_mask_sizes(0)
    assert snapshot(cache) == before


@pytest.mark.parametrize("exc", [RuntimeError("between layers"), KeyboardInterrupt()])
def test_finding_1_a_forward_failing_between_layers_is_rolled_back(exc):
    model = random_model("llama", dtype=torch.float64)  # two layers
    cache, ref = _prefilled(9, model), _prefilled(9, model)
    before = snapshot(cache)
    with _Raise(model.model.layers[1], exc), pytest.raises(type(exc)), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), past_key_values=cache, use_cache=True)
    assert cache.seq_len(0) == 9 and snapshot(cache) == before
    with torch.no_grad():  # the next forward is exact: same logits as on a cache that never saw the failure
        got = model(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits
        want = model(input_ids=torch.tensor([[7]]), past_key_values=ref, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_finding_1_a_failing_prefill_changes_nothing():
    cache = _prefilled()
    before = snapshot(cache)
    with _Raise(MODEL.model.layers[0].mlp, RuntimeError("prefill")), pytest.raises(RuntimeError):
        cache.prefill(MODEL, torch.tensor([[1, 2, 3]]))
    assert snapshot(cache) == before


def test_finding_2_set_window_is_all_or_nothing(monkeypatch):
    cache = _prefilled(30)
    cache.fork(0, 2)
    before = snapshot(cache)
    real, calls = HostState.apply_window, []

    def fail_on_the_third(self, seq):
        calls.append(seq)
        if len(calls) == 3:
            raise CachePoolFullError("the third sequence needs blocks")
        real(self, seq)

    monkeypatch.setattr(HostState, "apply_window", fail_on_the_third)
    with pytest.raises(CachePoolFullError):
        cache.set_window(4, 8)
    assert snapshot(cache) == before and cache.window is None


@pytest.mark.parametrize("delta", [-(2**63), -(2**31) - 1, 2**31, 2**62])
def test_finding_4_the_op_refuses_deltas_outside_the_bound(delta):
    from gaugecompile import RopeSpec, rotated_query_attention

    rope = RopeSpec.from_base(10000.0, 16)
    q, pool = torch.randn(1, 2, 1, 16), torch.randn(3, 4, 2, 16)
    args = (torch.tensor([[0, 1]]), torch.tensor([[0, delta]]), torch.tensor([8]), rope)
    for impl in ("auto", "loop", "reference"):
        with pytest.raises(ValueError, match="block_delta"):
            rotated_query_attention(q, pool, pool, *args, impl=impl)


def test_finding_4_the_bound_itself_is_exact():
    """-2^31 and 2^31 - 1 are inside the bound, and their angles are exact (to ~1e-15 rad against mpmath)."""
    import mpmath

    from gaugecompile.rope import MAX_ABS_DELTA, reduced_angles

    freqs = torch.tensor([1.0, 0.7390851332151607, 10000.0 ** (-2 / 64)], dtype=torch.float64)
    deltas = [-MAX_ABS_DELTA, MAX_ABS_DELTA - 1, 1_234_567_891, -2_000_000_011]
    got = reduced_angles(torch.tensor(deltas), freqs)
    with mpmath.workprec(200):
        for i, d in enumerate(deltas):
            for j, f in enumerate(freqs.tolist()):
                exact = mpmath.mpf(d) * mpmath.mpf(f)
                exact -= 2 * mpmath.pi * mpmath.nint(exact / (2 * mpmath.pi))
                assert abs(float(exact - mpmath.mpf(float(got[i, j])))) < 3e-15


@pytest.mark.parametrize("at", [2**31, 2**62, 2**63, -1])
def test_finding_4_splice_beyond_the_bound_is_refused_without_leaks(at):
    cache = _prefilled()
    chunk = cache.chunk(0, 2, 6)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="at: expected"):
        cache.splice(0, chunk, at)
    assert snapshot(cache) == before
    chunk.free()
    cache.reset()
    assert cache.blocks_in_use == 0


def test_finding_4_a_splice_below_the_bound_stays_exact():
    cache = _prefilled(8)
    chunk = cache.chunk(0, 0, 8)
    cache.splice(0, chunk, cache.max_position - 100)  # a stream attached near the bound
    chunk.free()
    assert cache.next_position(0) == cache.max_position - 92
    _, deltas, _ = cache.mapping(0)
    assert max(abs(d) for d in deltas) < 2**31


def test_pools_are_sized_by_the_first_update_not_the_config():
    """A tensor-parallel rank (or a model ignoring a config attribute) hands the cache fewer KV heads than the
    config says: the pools take the model's, the logits are DynamicCache's, other head counts are refused."""
    model = random_model("llama", dtype=torch.float64, num_attention_heads=4, num_key_value_heads=2)
    cache = ManifoldCache(random_config("llama", num_attention_heads=4, num_key_value_heads=4), max_batch_size=2,
                          max_tokens=64, block_size=4, kv_dtype=torch.float64)
    assert cache.k_pools == [None] * model.config.num_hidden_layers and cache.bytes_per_block == 0
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits,
               model(input_ids=ids[:, :2], past_key_values=cache, use_cache=True).logits]
        dyn = DynamicCache(config=model.config)
        want = [model(input_ids=ids, past_key_values=dyn, use_cache=True).logits,
                model(input_ids=ids[:, :2], past_key_values=dyn, use_cache=True).logits]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert [tuple(k.shape[2:]) for k in cache.k_pools] == [(2, model.config.head_dim)] * model.config.num_hidden_layers
    other = random_model("llama", dtype=torch.float64, num_attention_heads=4, num_key_value_heads=4)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"key_states: expected \[batch, 2, q_len, .*layer 0's pools"), torch.no_grad():
        other(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert snapshot(cache) == before


def test_a_failed_first_forward_drops_the_pools_it_sized():
    model = random_model("llama", dtype=torch.float64)
    cache = _cache(model)
    before = snapshot(cache)
    with _Raise(model.model.layers[1], RuntimeError("layer 1")), pytest.raises(RuntimeError), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), past_key_values=cache, use_cache=True)
    assert cache.sequences == ()  # an accessor: the failed forward is rolled back, the pools it sized too
    assert cache.k_pools == [None] * model.config.num_hidden_layers and snapshot(cache) == before


@pytest.mark.parametrize("override", [dict(head_dim=8), dict(num_hidden_layers=2)])
def test_finding_5_kv_that_do_not_fit_the_pools_are_refused_before_any_change(override):
    model = random_model("llama", dtype=torch.float64, **override)
    cache = ManifoldCache(random_config("llama", num_hidden_layers=1), max_batch_size=2, max_tokens=64,
                          block_size=4, kv_dtype=torch.float64)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="key_states|layer_idx"), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)
    assert snapshot(cache) == before


def test_finding_5_pool_full_after_the_implicit_fork_leaves_no_forks():
    cache = _prefilled(8, max_batch_size=4, max_tokens=9, block_size=4)  # 3 + 4 blocks, 2 used
    before = snapshot(cache)
    with pytest.raises(CachePoolFullError), torch.no_grad():  # 4 beams: 4 partial blocks to copy-on-write... 2 free
        MODEL(input_ids=torch.tensor([[1, 2, 3, 4, 5]] * 4), past_key_values=cache, use_cache=True)
    assert snapshot(cache) == before and cache.sequences == (0,)


@pytest.mark.parametrize("prefix,span", [(3, 5), (6, 9), (1, 1)])
def test_finding_6_unaligned_splices_and_ragged_chunks_are_accepted(prefix, span):
    gen = torch.Generator().manual_seed(prefix)
    prompt = torch.randint(0, VOCAB, (1, prefix), generator=gen)
    doc = torch.randint(0, VOCAB, (1, span), generator=gen)
    cache = _cache()
    with torch.no_grad():
        MODEL(input_ids=prompt, past_key_values=cache, use_cache=True)
    chunk = cache.prefill(MODEL, doc)
    cache.splice(0, chunk, prefix)
    chunk.free()
    new = [3, 1]
    with torch.no_grad():
        got = MODEL(input_ids=torch.tensor([new]), past_key_values=cache, use_cache=True).logits[0]
    toks = list(zip(prompt[0].tolist() + doc[0].tolist(), range(prefix + span), strict=True))
    torch.testing.assert_close(got, _reference_logits(MODEL, toks, new, prefix + span), rtol=0, atol=1e-6)


def test_finding_7_compiled_graphs_check_the_mapping_values():
    from gaugecompile import RopeSpec

    rope = RopeSpec.from_base(10000.0, 16)
    pool = torch.randn(3, 4, 2, 16)

    @torch.compile(backend="inductor", fullgraph=True)
    def step(q, table, delta, lens):
        attn = torch.ops.gauge.rotated_query_attention(q, pool, pool, table, delta, lens, rope.inv_freq, 16, False,
                                                        0.25, True)[0]
        view = torch.ops.gauge.materialize_kv(pool, pool, table, delta, lens, rope.inv_freq, 16, False, 8)[0]
        return attn, view

    q, delta, lens = torch.randn(1, 2, 1, 16), torch.zeros(1, 2, dtype=torch.long), torch.tensor([[4, 4]])
    step(q, torch.tensor([[0, 1]]), delta, lens)
    for table in ([[0, 7]], [[-1, 0]]):
        with pytest.raises(ValueError, match="block_table"):
            step(q, torch.tensor(table), delta, lens)
    with pytest.raises(ValueError, match="block_lens: row 0, entry 1 holds 5 tokens"):
        step(q, torch.tensor([[0, 1]]), delta, torch.tensor([[4, 5]]))
    with pytest.raises(ValueError, match="block_lens: row 0 holds 7 tokens; expected length=8"):
        step(q, torch.tensor([[0, 1]]), delta, torch.tensor([[4, 3]]))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8, "int3", "fp8"])
def test_finding_7_caches_of_no_kv_format_are_refused(dtype):
    with pytest.raises(ValueError, match="kv_dtype: expected one of"):
        ManifoldCache(MODEL.config, max_batch_size=1, max_tokens=8, kv_dtype=dtype)


def test_finding_7_prefill_refuses_a_model_with_another_rope_theta():
    other = random_model("llama", num_hidden_layers=1, dtype=torch.float64, rope_theta=500000.0)
    cache = _cache()
    before = snapshot(cache)
    with pytest.raises(ValueError, match="RoPE basis"):
        cache.prefill(other, torch.tensor([[1, 2, 3]]))
    assert snapshot(cache) == before


def _other_theta_cache() -> ManifoldCache:
    """A cache built from a config whose rope theta differs from MODEL's, prefilled and edited (deltas nonzero)."""
    config = copy.deepcopy(MODEL.config)
    config.rope_parameters = {**config.rope_parameters, "rope_theta": 10 * config.rope_parameters["rope_theta"]}
    cache = ManifoldCache(config, max_batch_size=1, max_tokens=64, block_size=4, kv_dtype=torch.float64)
    with torch.no_grad():
        MODEL(input_ids=torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1)),
              past_key_values=cache, use_cache=True)
    cache.delete(0, 2, 5)
    return cache


def test_finding_7_a_compiled_model_refuses_a_cache_of_another_rope_basis():
    """Eagerly the cache cannot see the model's rotary module; compiled, the rewritten attention checks the basis
    the queries are rotated with against the cache's (`gauge::check_rope_basis`) and the failed forward rolls back."""
    cache = _other_theta_cache()
    before = snapshot(cache)
    torch._dynamo.reset()
    compiled = torch.compile(MODEL, backend="gauge")
    with pytest.raises(ValueError, match="rope: the model rotates its queries with inv_freq"), torch.no_grad():
        compiled(input_ids=torch.tensor([[3]]), past_key_values=cache, use_cache=True)
    assert cache.sequences == (0,)  # the next call finds the forward pending and rolls it back
    assert snapshot(cache) == before


def test_finding_7_an_export_refuses_a_cache_of_another_rope_basis():
    from gaugecompile.onnx.cache_step import CacheStep

    cache = _other_theta_cache()
    before = snapshot(cache)
    with pytest.raises(ValueError, match="rope: differs from the RoPE basis of the model's config"):
        CacheStep.capture(MODEL, cache, torch.tensor([[3]]))
    assert snapshot(cache) == before
