"""Geometry probes (`gaugecompile.research.geometry`): edits preserve them.

Over a ManifoldCache after delete, splice or set_window, the probes of a forward equal those over the
re-rotated reference (a DynamicCache holding the same tokens' keys, cut and re-rotated to their new positions
with exact float64 angles): key cosines, attention entropies and the value manifold are properties of the
view, not of where its data sits.  Also: the entropies are those of the attention weights, recomputed here.
"""

import math

import pytest
import torch
from transformers import DynamicCache

from gaugecompile import RopeSpec
from gaugecompile.cache import ManifoldCache
from gaugecompile.models.random_configs import random_model
from gaugecompile.research.geometry import probe_geometry

MODEL = random_model("llama", dtype=torch.float64)
ROPE = RopeSpec(MODEL.model.rotary_emb.inv_freq)
GEN = torch.Generator().manual_seed(0)
PROMPT = torch.randint(0, 128, (1, 24), generator=GEN)
DOC = torch.randint(0, 128, (1, 7), generator=GEN)
QUERY = torch.randint(0, 128, (1, 6), generator=GEN)


def _kv(ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = DynamicCache()
    with torch.no_grad():
        MODEL(input_ids=ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rot(k: torch.Tensor, shift: int) -> torch.Tensor:
    cos, sin = ROPE.cos_sin(torch.tensor(shift), torch.float64)
    from gaugecompile.rope import rotate

    return rotate(k, cos, sin, ROPE.rotary_dim, ROPE.interleaved)


def _reference(parts) -> DynamicCache:
    """parts: per layer list of (keys, values, shift) pieces in view order -> a DynamicCache of their concatenation."""
    ref = DynamicCache()
    for i, pieces in enumerate(parts):
        ref.update(torch.cat([_rot(k, s) for k, _, s in pieces], 2), torch.cat([v for _, v, _ in pieces], 2), i)
    return ref


def _cache_with_prompt() -> ManifoldCache:
    cache = ManifoldCache(MODEL.config, max_batch_size=1, max_tokens=128, block_size=4, kv_dtype=torch.float64)
    with torch.no_grad():
        MODEL(input_ids=PROMPT, past_key_values=cache, use_cache=True)
    return cache


def _edited(edit: str):
    cache, full = _cache_with_prompt(), _kv(PROMPT)
    if edit == "delete":
        cache.delete(0, 5, 11)
        parts = [[(k[:, :, :5], v[:, :, :5], 0), (k[:, :, 11:], v[:, :, 11:], -6)] for k, v in full]
    elif edit == "splice":
        chunk = cache.prefill(MODEL, DOC)
        cache.splice(0, chunk, 9)
        chunk.free()
        doc = _kv(DOC)
        parts = [[(k[:, :, :9], v[:, :, :9], 0), (dk, dv, 9), (k[:, :, 9:], v[:, :, 9:], 7)]
                 for (k, v), (dk, dv) in zip(full, doc, strict=True)]
    else:  # set_window(4, 12) on 24 aligned tokens keeps the first and the last 3 blocks: [0, 4) and [12, 24)
        cache.set_window(4, 12)
        parts = [[(k[:, :, :4], v[:, :, :4], 0), (k[:, :, 12:], v[:, :, 12:], -8)] for k, v in full]
    return cache, _reference(parts)


@pytest.mark.parametrize("edit", ["delete", "splice", "set_window"])
def test_edits_preserve_the_geometry(edit):
    cache, ref = _edited(edit)
    got, want = probe_geometry(MODEL, QUERY, cache), probe_geometry(MODEL, QUERY, ref)
    assert len(got) == MODEL.config.num_hidden_layers
    for a, b in zip(got, want, strict=True):
        for name, x in a.as_dict().items():
            y = b.as_dict()[name]
            assert x == pytest.approx(y, rel=1e-6, abs=1e-8, nan_ok=True), (edit, a.layer, name)
    # the probe's eager switch is undone (read from the config: transformers has no public getter of it)
    assert MODEL.config._attn_implementation == "sdpa"


def test_entropies_are_those_of_the_attention_weights():
    cache = _cache_with_prompt()
    (layer0, *_) = probe_geometry(MODEL, QUERY, cache)
    with torch.no_grad():
        MODEL.set_attn_implementation("eager")
        ref = _cache_with_prompt()
        out = MODEL(input_ids=QUERY, past_key_values=ref, use_cache=True, output_attentions=True)
        MODEL.set_attn_implementation("sdpa")
    p = out.attentions[0][0]  # [heads, q, n]
    bits = -torch.special.xlogy(p, p).sum(-1) / math.log(2)  # 0 log 0 = 0 (the causal zeros)
    assert layer0.entropy_bits == pytest.approx(bits.mean(1).tolist(), rel=1e-9)
    assert 0 < max(layer0.entropy_bits) <= math.log2(PROMPT.shape[1] + QUERY.shape[1])
    assert sum(layer0.value_pc_share) <= 1 + 1e-12


def test_the_probe_command_writes_json_and_a_plot(tmp_path):
    import json

    from gaugecompile.cli import main

    assert main(["probe", "--random", "llama", "--tokens", "24", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "probes.json").read_text())
    assert data["tokens"] == 24 and [g["layer"] for g in data["layers"]] == [0, 1]
    assert (tmp_path / "probes.png").stat().st_size > 10_000
