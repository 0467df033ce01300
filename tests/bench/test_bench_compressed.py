"""Scenario 11 (compressed KV pools) in its CI size on a random Llama: every table is filled and its figures are
consistent (float32 pools are their own reference, compressed formats store fewer bytes); no timing is asserted."""

import torch

from gaugecompile.bench.compressed import FORMATS, scenario_compressed
from gaugecompile.models import random_model


def test_scenario_fills_every_table():
    model = random_model("llama")
    torch._dynamo.reset()
    result = scenario_compressed(model, lambda n: torch.randint(0, 128, (1, n), generator=torch.Generator()
                                                                .manual_seed(0)), quick=True)
    rows = result["rows"]
    quality = [r for r in rows if r["table"] == "quality"]
    assert [r["kv_dtype"] for r in quality] == list(FORMATS)
    assert quality[0]["nll_increase"] == 0 and quality[0]["kl"] <= 1e-9 and quality[0]["top1_agreement"] == 1
    assert all(r["kl"] >= -1e-7 and 0 <= r["top1_agreement"] <= 1 for r in quality)
    memory = {r["kv_dtype"]: r["vs_float32"] for r in rows if r["table"] == "memory"}
    assert memory["float32"] == 1 and memory["int4"] < memory["int8"] < memory["bfloat16"] < 1
    attention = [r for r in rows if r["table"] == "decode attention"]
    assert len(attention) == 3 * len(FORMATS) and all(r["gauge_s"] > 0 and r["floor_s"] > 0 for r in attention)
    steps = [r for r in rows if r["table"] == "decode step"]
    assert [r["kv_dtype"] for r in steps] == ["float32", "int8"] and steps[1]["kv_bytes"] < steps[0]["kv_bytes"]
