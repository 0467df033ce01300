"""Transformers models with ManifoldCache exported to ONNX: one ai.gauge node per layer, onnxruntime
logits and updated pools equal to the eager step, after `delete` and `splice` (deltas near 2^30)."""

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
    """A 20-token prompt, tokens [4, 8) deleted, an 8-token chunk spliced at 2^30."""
    gen = torch.Generator().manual_seed(seed)
    cache = ManifoldCache(model.config, max_batch_size=2, max_tokens=256, block_size=4)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 20), generator=gen), past_key_values=cache, use_cache=True)
    cache.delete(0, 4, 8)
    chunk = cache.prefill(model, torch.randint(0, 128, (1, 8), generator=gen))
    cache.splice(0, chunk, 2**30)
    assert max(abs(d) for d in cache.mapping(0)[1]) > 2**29
    return cache


def export_and_compare(tmp_path, arch: str, q_len: int):
    model = random_model(arch)
    cache = edited_cache(model, seed=q_len)
    new = torch.randint(0, 128, (1, q_len), generator=torch.Generator().manual_seed(1))
    step, args, logits = CacheStep.capture(model, cache, new)
    path = tmp_path / f"{arch}.onnx"
    proto = export_onnx(step, args, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    input_ids, position_ids, table, delta, slots, k_pools, v_pools = args
    outs = run(path, [input_ids, position_ids, table, delta, slots, *k_pools, *v_pools])
    layers = model.config.num_hidden_layers
    want = [logits, *cache.k_pools, *cache.v_pools]
    assert len(outs) == 1 + 2 * layers
    errors = [float(np.abs(o - w.numpy()).max()) for o, w in zip(outs, want, strict=True)]
    assert max(errors) < TOL32, errors
    return [n for n in proto.graph.node if n.domain == DOMAIN], layers


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
