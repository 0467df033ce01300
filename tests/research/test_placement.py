"""Learnable chunk placement (`gaugecompile.research.placement`) against independently written references.

- At whole gaps the placed chunks give the logits of a DynamicCache whose chunk keys were re-rotated to the
  same positions (the integer path) with the query placed by explicit position ids (the model's own RoPE).
- d NLL / d gaps equals autograd through the plain-torch gather + re-rotate, and central differences.
- A small Adam step along the gradient lowers the loss; the grid search evaluates every grid point.
- The store's pools and chunks are never changed; bad arguments are named.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import gaugecompile.research.placement as placement_module
from gaugecompile import ManifoldCache
from gaugecompile.bench.baselines import append_rerotated, rope_of_model
from gaugecompile.models import random_model
from gaugecompile.ops.materialize import materialize_views
from gaugecompile.research.placement import ChunkPlacement, grid_search, learn_gaps

SPANS = (7, 10, 5)  # partial last blocks (block size 4)


def _setup(dtype=torch.float32):
    model = random_model("llama", dtype=dtype).eval()
    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=128, block_size=4, kv_dtype=dtype)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in SPANS]
    chunks = [cache.prefill(model, ids) for ids in docs]
    query = torch.randint(0, model.config.vocab_size, (1, 3), generator=g)
    answer = torch.randint(0, model.config.vocab_size, (1, 4), generator=g)
    return model, cache, docs, chunks, query, answer


def test_whole_gaps_equal_rerotated_chunks_with_the_query_placed_by_position_ids():
    model, cache, docs, chunks, query, answer = _setup()
    gaps = [3.0, 0.0, 5.0]
    placement = ChunkPlacement(cache, chunks, gaps)
    with torch.no_grad():
        got = model(input_ids=query, past_key_values=placement.past(model), use_cache=True).logits
        reference, at = DynamicCache(config=model.config), 0
        for ids, gap in zip(docs, gaps, strict=True):
            alone = DynamicCache(config=model.config)
            model(input_ids=ids, past_key_values=alone, use_cache=True)
            if reference.get_seq_length() == 0:  # the first chunk at 0
                model(input_ids=ids, past_key_values=reference, use_cache=True)
            else:
                append_rerotated(reference, alone, at, rope_of_model(model))
            at += ids.shape[1] + int(gap)
        positions = torch.arange(at, at + query.shape[1])[None]
        expected = model(input_ids=query, past_key_values=reference, position_ids=positions, use_cache=True).logits
    assert placement.starts().tolist() == [0.0, 10.0, 20.0, 30.0]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_gap_gradient_equals_autograd_through_plain_torch_and_finite_differences(monkeypatch):
    """The op's adjoint against autograd through the gather + re-rotate written in torch ops (exact), and both
    against central differences of the loss (the model's RoPE runs in float32, so a wide step and a loose bound)."""
    model, cache, _, chunks, query, answer = _setup(torch.float64)
    placement = ChunkPlacement(cache, chunks)
    at = torch.tensor([1.5, 2.25, 0.75], dtype=torch.float64)

    def gradient():
        gaps = at.clone().requires_grad_()
        placement.nll(model, query, answer, gaps=gaps).backward()
        return gaps.grad

    fused = gradient()
    monkeypatch.setattr(placement_module, "materialize_kv", lambda k, v, t, d, rope, n, lens: materialize_views(
        k, v, t, d, lens, rope.inv_freq, rope.rotary_dim, rope.interleaved, n))
    torch.testing.assert_close(fused, gradient(), rtol=1e-9, atol=1e-12)
    step = 2.0**-3
    with torch.no_grad():
        central = torch.stack([(placement.nll(model, query, answer, gaps=at + step * e)
                                - placement.nll(model, query, answer, gaps=at - step * e)) / (2 * step)
                               for e in torch.eye(3, dtype=torch.float64)])
    assert (fused != 0).all()
    torch.testing.assert_close(fused, central, rtol=0.1, atol=1e-5)


def test_a_small_step_along_the_gradient_lowers_the_loss_and_the_store_is_untouched():
    model, cache, _, chunks, query, answer = _setup()
    before = [p.clone() for p in cache.k_pools + cache.v_pools]
    refs = cache.blocks_in_use
    placement = ChunkPlacement(cache, chunks, [2.0, 2.0, 2.0])
    run = learn_gaps(placement, model, query, answer, steps=2, lr=1e-2)
    assert run.forwards == 2 and run.backwards == 1
    assert run.losses[1] < run.losses[0]
    assert all(abs(a - b) == pytest.approx(1e-2, rel=1e-3) for a, b in zip(run.gaps, [2.0] * 3, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k_pools + cache.v_pools, strict=True))
    assert cache.blocks_in_use == refs and not any(c.freed for c in chunks)
    assert all(p.requires_grad for p in model.parameters())  # learn_gaps gives the model its gradients back


def test_grid_search_evaluates_every_point_and_keeps_the_best():
    model, cache, _, chunks, query, answer = _setup()
    placement = ChunkPlacement(cache, chunks)
    run = grid_search(placement, model, query, answer, [0, 8])
    assert run.forwards == 8 and run.loss == min(run.losses)
    assert placement.gaps.tolist() == run.gaps
    with torch.no_grad():
        assert float(placement.nll(model, query, answer)) == pytest.approx(run.loss, abs=1e-6)


def test_bad_arguments_are_named():
    model, cache, _, chunks, query, answer = _setup()
    other = ManifoldCache(model.config, max_batch_size=1, max_tokens=32, block_size=4)
    with pytest.raises(ValueError, match="gaps: expected 3 gaps"):
        ChunkPlacement(cache, chunks, [1.0])
    with pytest.raises(ValueError, match="gaps: expected finite gaps >= 0"):
        ChunkPlacement(cache, chunks, [1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match=r"chunks\[0\]: expected a live KVChunk of this cache"):
        ChunkPlacement(other, chunks)
    placement = ChunkPlacement(cache, chunks)
    with pytest.raises(ValueError, match="answer: expected token ids"):
        placement.nll(model, query, answer[0])
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        learn_gaps(placement, model, query, answer, steps=0)
    assert placement.gaps.tolist() == [0.0, 0.0, 0.0]
