"""Transformers models with ManifoldCache exported to ONNX: one ai.gauge node per layer, onnxruntime
logits and updated pools equal to the eager step, after `delete` and `splice` (deltas near 2^30), and
one export serving other batch sizes, query lengths, block-table widths and view lengths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from gaugecompile.cache import ManifoldCache
from gaugecompile.models.random_configs import random_model
from gaugecompile.onnx import DOMAIN, CacheStep, export_onnx, run

TOL32 = 1e-4


def edited_cache(model, seed: int) -> ManifoldCache:
    """A 20-token prompt, tokens [3, 9) deleted (off block boundaries: a partial entry, a copied one), an 8-token
    chunk spliced at 2^30."""
    gen = torch.Generator().manual_seed(seed)
    cache = ManifoldCache(model.config, max_batch_size=2, max_tokens=256, block_size=4)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 20), generator=gen), past_key_values=cache, use_cache=True)
    cache.delete(0, 3, 9)
    assert cache.mapping(0)[2][:2] == [3, 3]
    chunk = cache.prefill(model, torch.randint(0, 128, (1, 8), generator=gen))
    cache.splice(0, chunk, 2**30)
    assert max(abs(d) for d in cache.mapping(0)[1]) > 2**29
    return cache


def step_error(path, model, cache, new) -> tuple[float, tuple[int, int]]:
    """Run one step of `cache` eagerly and through the ONNX file at `path`: the largest difference over the
    logits and every updated pool, and the step's (block-table width, view length)."""
    step, args, logits = CacheStep.capture(model, cache, new)
    *tensors, k_pools, v_pools = args
    outs = run(path, [*tensors, *k_pools, *v_pools])
    want = [logits, *cache.k_pools, *cache.v_pools]
    assert len(outs) == 1 + 2 * model.config.num_hidden_layers
    error = max(float(np.abs(o - w.numpy()).max()) for o, w in zip(outs, want, strict=True))
    return error, (tensors[2].shape[1], tensors[6].shape[1])


def export_and_compare(tmp_path, arch: str, q_len: int):
    model = random_model(arch)
    cache = edited_cache(model, seed=q_len)
    new = torch.randint(0, 128, (1, q_len), generator=torch.Generator().manual_seed(1))
    step, args, _ = CacheStep.capture(model, edited_cache(model, seed=q_len), new)
    path = tmp_path / f"{arch}.onnx"
    proto = export_onnx(step, args, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert step_error(path, model, cache, new)[0] < TOL32
    return [n for n in proto.graph.node if n.domain == DOMAIN], model.config.num_hidden_layers


@pytest.mark.parametrize("arch,q_len", [("llama", 1), ("llama", 3), ("gpt_neox", 1)])
def test_decode_step_one_node_per_layer(tmp_path, arch, q_len):
    nodes, layers = export_and_compare(tmp_path, arch, q_len)
    assert len(nodes) == layers
    assert {n.op_type for n in nodes} == {"RotatedQueryAttention"}


def test_gptj_interleaved(tmp_path):
    nodes, layers = export_and_compare(tmp_path, "gptj", 1)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert len(nodes) == layers
    assert all(a["interleaved"] == 1 for a in attrs)


def test_one_export_serves_other_lengths_widths_batches_and_queries(tmp_path):
    """Exported once (two rows, three new tokens, dynamic shapes), the file runs later decode and multi-token steps,
    and a prefill into an empty cache, whose view length, block-table width, batch and query length differ from the
    example's."""
    model = random_model("llama")
    gen = torch.Generator().manual_seed(6)

    def two_rows(seed):
        cache = edited_cache(model, seed)
        cache.set_batch([0, *cache.fork(0, 1)])
        return cache

    step, args, _ = CacheStep.capture(model, two_rows(5), torch.randint(0, 128, (2, 3), generator=gen))
    path = tmp_path / "llama_dynamic.onnx"
    export_onnx(step, args, path, dynamic_shapes=CacheStep.dynamic_shapes(model.config.num_hidden_layers))
    shapes = []
    cache = two_rows(5)
    for q_len in (3, 1, 5, 1, 4):
        error, shape = step_error(path, model, cache, torch.randint(0, 128, (2, q_len), generator=gen))
        assert error < TOL32, (q_len, shape, error)
        shapes.append(shape)
    one_row = edited_cache(model, seed=7)
    one_row.delete(0, 0, 8)
    for q_len in (2, 1):
        error, shape = step_error(path, model, one_row, torch.randint(0, 128, (1, q_len), generator=gen))
        assert error < TOL32, (q_len, shape, error)
        shapes.append(shape)
    fresh = ManifoldCache(model.config, max_batch_size=2, max_tokens=256, block_size=4)  # a prefill from nothing
    error, shape = step_error(path, model, fresh, torch.randint(0, 128, (2, 6), generator=gen))
    assert error < TOL32 and shape == (2, 6), (shape, error)
    shapes.append(shape)
    widths, lengths = {w for w, _ in shapes}, {n for _, n in shapes}
    assert len(widths) >= 2 and len(lengths) == len(shapes), shapes  # one file, many sizes


def test_export_onnx_takes_a_model_called_over_a_manifold_cache(tmp_path):
    """Issue 21, first item: `export_onnx(model, (ids,), path, kwargs={"past_key_values": cache})` exports the
    step the model would run (CacheStep's form), leaves the cache as it was, and the file runs later steps."""
    from cache_state import snapshot

    model = random_model("llama")
    cache = edited_cache(model, seed=3)
    cache.set_batch([0, *cache.fork(0, 1)])  # two rows and two new tokens: nothing is specialised to 1
    gen = torch.Generator().manual_seed(4)
    before = snapshot(cache)
    proto = export_onnx(model, (torch.randint(0, 128, (2, 2), generator=gen),), tmp_path / "step.onnx",
                        kwargs={"past_key_values": cache})
    assert snapshot(cache) == before
    assert len([n for n in proto.graph.node if n.domain == DOMAIN]) == model.config.num_hidden_layers
    for q_len in (2, 1, 3):
        error, _ = step_error(tmp_path / "step.onnx", model, cache, torch.randint(0, 128, (2, q_len), generator=gen))
        assert error < TOL32, (q_len, error)
    with pytest.raises(ValueError, match="args/kwargs: a model over a ManifoldCache exports from"):
        export_onnx(model, (torch.ones(2, 1, dtype=torch.long),), tmp_path / "x.onnx",
                    kwargs={"past_key_values": cache, "attention_mask": torch.ones(2, 1)})
