"""Weight-only quantized models (torchao, applied as its users do: `quantize_(model, config)`) under
`backend="gauge"`: every attention site rewritten, the kernel run, and the run equal to the same quantized model
in eager mode through transformers' DynamicCache.

torchao's int8 weight-only tensors and its int4 weights unpacked to int8 storage (`IntxWeightOnlyConfig`, the
int4 path that runs on a CPU) flow through Dynamo as tensor subclasses; the passes see the dequantised matmuls
around the attention and rewrite the attention as for any model.  torchao 0.18's `Int4WeightOnlyConfig` has no
CPU path (its packing formats need CUDA, XPU/NPU or the `mslk` package): `test_int4_packed_formats_need_a_gpu`
keeps that fact checked, so the day one runs here the test says so.
"""

from __future__ import annotations

import pytest
import torch
from greedy_choices import assert_same_choices, generate_with_logits
from transformers import DynamicCache

from gaugecompile.cache import ManifoldCache
from gaugecompile.models import random_model
from gaugecompile.ops.counters import runs

torchao = pytest.importorskip("torchao", reason="torchao is in the test and quant extras")
from torchao.quantization import (  # noqa: E402
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup  # noqa: E402

CONFIGS = {
    "int8": lambda: Int8WeightOnlyConfig(),
    "int4-intx": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
}
ATOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("fresh_compile")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", list(CONFIGS))
def test_quantized_model_is_rewritten_and_equals_its_eager_run(quant, dtype):
    model = random_model("llama", seed=2, dtype=dtype)
    quantize_(model, CONFIGS[quant]())
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)  # quantized, not left as it was
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    want_seq, want = generate_with_logits(model, DynamicCache(config=model.config), ids, max_new_tokens=8)
    sink: list = []
    model.compile(backend="gauge", options={"report_sink": sink})
    got_seq, got = generate_with_logits(model, ManifoldCache(model, max_batch_size=1, max_tokens=64, block_size=4), ids,
                             max_new_tokens=8)
    reports = [r for r, _, _ in sink if r.rewritten or r.refused]
    assert reports and all(not r.refused and len(r.rewritten) == model.config.num_hidden_layers for r in reports)
    assert runs["kernel"] > 0 and runs["masked_fallback"] == 0, dict(runs)
    assert_same_choices(want, got, ATOL[dtype])
    if torch.equal(got.argmax(-1), want.argmax(-1)):
        assert torch.equal(got_seq, want_seq)


def test_int4_packed_formats_need_a_gpu():
    """What a CPU user meets with torchao's int4 weight-only config: every packing format refuses the CPU."""
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    for packing in Int4PackingFormat:
        layer = torch.nn.Sequential(torch.nn.Linear(64, 32, dtype=torch.bfloat16))
        with pytest.raises((ImportError, NotImplementedError, AssertionError, RuntimeError, ValueError)):
            quantize_(layer, Int4WeightOnlyConfig(group_size=32, int4_packing_format=packing))
            layer(torch.randn(2, 64, dtype=torch.bfloat16))
