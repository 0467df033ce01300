"""Hybrid models: ManifoldCache keeps the conv/recurrent states of linear-attention, SSM and convolution layers
beside the attention pools, per sequence.

References written independently of `gaugecompile.cache.states`: transformers' own `DynamicCache` (its
`LinearAttentionLayer`s) for generation, and for the per-sequence bookkeeping separate DynamicCache runs, one
per sequence.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionLayer

from gaugecompile.cache import ManifoldCache
from gaugecompile.cache.states import LayerStates
from gaugecompile.models.sweep import _build, tiny_config

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

# Qwen3-Next: gated delta-rule layers (conv + recurrent states) then full attention; Falcon-H1: every layer has
# both a Mamba-2 state and attention; LFM3: short convolutions (conv state only) around one attention layer.
TYPES = ("qwen3_next", "falcon_h1", "lfm3")
_MODELS: dict = {}


def _model(model_type: str):
    if model_type not in _MODELS:
        _MODELS[model_type] = _build(tiny_config(model_type))
    return _MODELS[model_type]


def _cache(model, **kwargs) -> ManifoldCache:
    return ManifoldCache(model.config, max_batch_size=4, max_tokens=256, block_size=4, **kwargs)


def _ids(n: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _state_of(cache: ManifoldCache):
    """Everything an operation must leave as it was: mapping, positions, batch and every state tensor."""
    seqs = cache.sequences
    return ([cache.mapping(s) for s in seqs], [cache.positions(s) for s in seqs], cache.batch, seqs,
            dict(cache.states.row_of), {k: t.clone() for k, t in cache.states.stored.items()}, cache.free_blocks)


def _assert_same(a, b):
    assert a[:5] == b[:5] and a[6] == b[6]
    assert a[5].keys() == b[5].keys() and all(torch.equal(t, b[5][k]) for k, t in a[5].items())


@pytest.mark.parametrize("model_type", TYPES)
def test_layer_kinds_are_read_from_the_config(model_type):
    cache = _cache(_model(model_type))
    kinds = cache.shape.kinds
    assert cache.states is not None and cache.states.layers == cache.shape.state_layers
    assert cache.attention_layers == tuple(i for i, k in enumerate(kinds) if "attention" in k)
    assert cache.is_linear == [k == "state" for k in kinds] and not cache.is_croppable


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("mode", ["greedy", "beams", "sample"])
def test_generate_matches_transformers_own_cache(model_type, mode):
    model = _model(model_type)
    kwargs = dict(input_ids=_ids(10, 1), max_new_tokens=6, do_sample=mode == "sample",
                  num_beams=3 if mode == "beams" else 1, num_return_sequences=2 if mode == "sample" else 1)
    outs = []
    for cache in (_cache(model), DynamicCache(config=model.config)):
        torch.manual_seed(0)
        outs.append(model.generate(past_key_values=cache, **kwargs).tolist())
    assert outs[0] == outs[1]


def _logits_alone(model, prompt, tokens):
    """Reference: one DynamicCache per sequence, its prompt then its tokens."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        return torch.cat([model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits
                          for t in tokens], 1)


@pytest.mark.parametrize("model_type", ["qwen3_next", "falcon_h1"])
def test_fork_reorder_and_free_copy_each_sequences_state(model_type):
    model = _model(model_type)
    prompt = _ids(9, 2)
    cache = _cache(model)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        (a,) = cache.batch
        (b,) = cache.fork(a, 1)  # rows share the prompt's state (aliased, no copy)
        step = model(input_ids=torch.tensor([[5], [7]]), past_key_values=cache, use_cache=True).logits
        cache.reorder([1, 1])  # both rows continue b's history (beam search keeps one beam twice)
        again = model(input_ids=torch.tensor([[9], [11]]), past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[0], _logits_alone(model, prompt, [5])[0])
    torch.testing.assert_close(step[1], _logits_alone(model, prompt, [7])[0])
    torch.testing.assert_close(again[0], _logits_alone(model, prompt, [7, 9])[0, 1:])
    torch.testing.assert_close(again[1], _logits_alone(model, prompt, [7, 11])[0, 1:])
    # a sequence outside the batch keeps its state while others run
    c, d = cache.batch
    cache.set_batch([c])
    with torch.no_grad():
        model(input_ids=torch.tensor([[13]]), past_key_values=cache, use_cache=True)
        cache.set_batch([d])
        later = model(input_ids=torch.tensor([[17]]), past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(later[0], _logits_alone(model, prompt, [7, 11, 17])[0, 2:])
    cache.free(d)
    assert d not in cache.states.row_of


@pytest.mark.parametrize("model_type", TYPES)
def test_edits_of_the_token_sequence_are_refused_before_any_change(model_type):
    model = _model(model_type)
    cache = _cache(model)
    with torch.no_grad():
        model(input_ids=_ids(12, 3), past_key_values=cache, use_cache=True)
    chunk = cache.chunk(0, 0, 4)  # a read-only handle is fine; placing it is not
    before = _state_of(cache)
    edits = {
        "delete": lambda: cache.delete(0, 2, 5),
        "splice": lambda: cache.splice(0, chunk, 3),
        "set_window": lambda: cache.set_window(2, 6),
        "crop": lambda: cache.crop(-2),
        "recompute": lambda: cache.recompute(model, 0, [(0, _ids(4, 3))]),
        "prefill": lambda: cache.prefill(model, _ids(4, 4)),
        "activate_past_recording": cache.activate_past_recording,
    }
    for name, edit in edits.items():
        with pytest.raises(ValueError, match=rf"^{name}: layers \[.*conv/recurrent states"):
            edit()
        _assert_same(before, _state_of(cache))


def test_a_forward_that_fails_in_a_state_layer_leaves_the_cache_as_it_was():
    model = _model("qwen3_next")  # layers 0-2 linear attention, 3 full attention
    cache = _cache(model)
    prompt = _ids(8, 5)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    before = _state_of(cache)

    def fail(*_):
        raise KeyboardInterrupt

    hook = model.model.layers[2].register_forward_pre_hook(fail)  # after layers 0-1 wrote their states
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(input_ids=torch.tensor([[6]]), past_key_values=cache, use_cache=True)
    finally:
        hook.remove()
    _assert_same(before, _state_of(cache))
    with torch.no_grad():
        got = model(input_ids=torch.tensor([[6]]), past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, _logits_alone(model, prompt, [6]))


def test_a_batch_mixing_continued_and_new_histories_is_refused():
    """(Unreachable through the cache's edits, which keep a batch's view lengths equal; checked here directly.)"""
    states = LayerStates((0,))
    states.begin([0])
    states.update_recurrent(0, torch.ones(1, 2), 0)
    states.commit([0], {0})
    with pytest.raises(ValueError, match=r"batch: sequences \[0\] continue a recurrent state and \[5\] start"):
        states.begin([0, 5])
    empty = ManifoldCache(tiny_config("qwen3_next"), max_batch_size=2, max_tokens=16)
    with pytest.raises(ValueError, match=r"view length, got lengths \[4, 0\]"), torch.no_grad():
        model = _model("qwen3_next")
        model(input_ids=_ids(4, 6), past_key_values=empty, use_cache=True)
        empty.new_sequences(1)
        model(input_ids=torch.tensor([[3], [4]]), past_key_values=empty, use_cache=True)


def test_state_calls_name_the_layer_and_what_was_expected():
    model = _model("qwen3_next")
    cache = _cache(model)
    with pytest.raises(ValueError, match=r"layer_idx: expected a state layer \[0, 1, 2\]"):
        cache.get_conv_state(3)
    with pytest.raises(RuntimeError, match=r"get_recurrent_state\(\) of layer 0 outside a forward"):
        cache.get_recurrent_state(0)
    k = torch.zeros(1, 2, 1, cache.shape.head_dim)
    with pytest.raises(ValueError, match=r"layer_idx: layer 1 is a state layer .* attention layers are \[3\]"):
        cache.update(k, k, 1)
    plain = ManifoldCache(tiny_config("llama"), max_batch_size=1, max_tokens=16)
    with pytest.raises(ValueError, match=r"no state layers"):
        plain.get_conv_state(0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(2, 5), st.lists(st.integers(1, 6), min_size=1, max_size=4),
       st.booleans(), st.integers(0, 2**16))
def test_conv_states_follow_transformers_linear_attention_layer(rows, kernel, lengths, explicit_kernel, seed):
    """Per forward of lengths[i] new columns: the cached columns and the ones returned equal transformers'."""
    g = torch.Generator().manual_seed(seed)
    ours, theirs = LayerStates((0,)), LinearAttentionLayer()
    seqs = list(range(rows))
    for q in lengths:
        x = torch.randn(rows, 3, q, generator=g, dtype=torch.float64)
        ours.begin(seqs)
        width = kernel if explicit_kernel else None
        got = ours.update_conv(0, x, 0, width)
        want = theirs.update_conv_state(x, 0, conv_kernel_size=width)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert ours.complete(seqs, set(seqs))
        ours.commit(seqs, set(seqs))
        torch.testing.assert_close(ours.stored[(0, "conv", 0)], theirs.conv_states[0], rtol=0, atol=0)


def test_aliased_rows_are_gathered_for_the_batch_and_dropped_when_unreferenced():
    states = LayerStates((0,))
    states.begin([0, 1])
    states.update_recurrent(0, torch.tensor([[1.0], [2.0]]), 0)
    states.commit([0, 1], {0, 1})
    states.alias([2, 3], [1, 1])  # fork of sequence 1, twice
    states.drop(0)
    states.begin([2, 3])
    assert states.get(0, "recurrent", 0).tolist() == [[2.0], [2.0]]
    states.update_recurrent(0, torch.tensor([[3.0], [4.0]]), 0)
    states.commit([2, 3], {1, 2, 3})
    assert states.row_of == {2: 0, 3: 1, 1: 2}  # sequence 0's row is gone, 1 keeps its own
    assert states.stored[(0, "recurrent", 0)].tolist() == [[3.0], [4.0], [2.0]]
