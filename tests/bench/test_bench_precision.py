"""Scenario 10 (decoding at the precision users run) in its CI size on a random Llama: every variant decodes, its
bytes are counted as stored, and its tokens are compared (figures only; no timing is asserted)."""

import importlib.util

import torch

from gaugecompile.bench.measure import weight_bytes
from gaugecompile.bench.precision import VARIANTS, scenario_precision, variant
from gaugecompile.models import random_model


def test_weight_bytes_count_what_each_variant_stores():
    model = random_model("llama")
    full = weight_bytes(model)
    assert full == sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes(variant(model, "bfloat16")) * 2 == full
    if importlib.util.find_spec("torchao"):
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        int8 = weight_bytes(variant(model, "int8 weights"))
        assert full - 3 * linear <= int8 < full - 2.9 * linear  # int8 linear weights, plus their scales


def test_scenario_runs_every_variant():
    model = random_model("llama")
    torch._dynamo.reset()
    result = scenario_precision(model, lambda n: torch.randint(0, 128, (1, n), generator=torch.Generator()
                                                               .manual_seed(0)), "no GGUF", quick=True)
    names = [r["measure"] for r in result["rows"]]
    expected = [n for n in VARIANTS if VARIANTS[n][1] is None or importlib.util.find_spec("torchao")]
    assert names == [f"decode step, {n}" for n in expected]
    float32 = result["rows"][0]
    assert float32["tokens_as_float32"] == "7/7" and float32["tokens_equal"]
    assert all(r["gauge_s"] > 0 and r["baseline_s"] > 0 for r in result["rows"])
    assert result["rows"][1]["reads_MB"] < float32["reads_MB"]
