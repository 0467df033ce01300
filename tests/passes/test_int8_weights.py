"""torchao int8 weight-only linears over bfloat16 activations become `aten._weight_int8pack_mm` in the gauge
backend's Inductor pass (`passes/int8_weights.py`); over float32 they are left as they are."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

torchao = pytest.importorskip("torchao", reason="torchao is in the test and quant extras")
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402


def _quantized(dtype: torch.dtype, features: tuple[int, int, int], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    k, n, m = features
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False), torch.nn.GELU(), torch.nn.Linear(n, m))
    model = model.to(dtype)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def _compiled(model: torch.nn.Module, sink: list) -> torch.nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="gauge", options={"report_sink": sink, "keep_graphs": True})


@settings(max_examples=3)
@given(features=st.tuples(st.sampled_from([16, 48, 64]), st.sampled_from([32, 96]), st.sampled_from([8, 40])),
       tokens=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_bfloat16_linears_become_the_fused_kernel(features, tokens, seed):
    """Each int8 linear is one `_weight_int8pack_mm`; the output equals the float64 product of the dequantised
    weights within bfloat16 rounding of the compiled chain's own error (the chain rounds twice, the kernel once)."""
    model = _quantized(torch.bfloat16, features, seed)
    x = torch.randn(2, tokens, features[0], generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x).double()
        sink: list = []
        got = _compiled(model, sink)(x).double()
    assert sum(r.int8_matmuls for r, _, _ in sink) == 2
    after = "".join(a for _, _, a in sink)
    assert after.count("aten._weight_int8pack_mm.default") == 2 and "aten.mm" not in after
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=2 ** -6 * want.abs().max().item())


def test_float32_linears_are_left_as_they_are():
    model = _quantized(torch.float32, (64, 96, 40), 0)
    x = torch.randn(1, 3, 64)
    sink: list = []
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model, sink)(x), model(x), rtol=1e-4, atol=1e-4)
    assert sum(r.int8_matmuls for r, _, _ in sink) == 0
