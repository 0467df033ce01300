"""Generated sources: specialised per spec, cached, loadable; specs read off inputs and validated."""

import ast

import pytest
import torch
from gaugecompile.codegen import KernelSpec, cache_dir, kernel_source, spec_for, used_specs

FIELDS = dict(head_dim=64, rotary_dim=64, interleaved=False, block_size=16, group=2, dtype="float32")
BASE = KernelSpec(**FIELDS)


def spec(**change) -> KernelSpec:
    return KernelSpec(**{**FIELDS, **change})


def test_source_is_valid_python_and_names_the_spec():
    text = kernel_source(BASE)
    tree = ast.parse(text)
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert names == ["_reduce", f"angles_{BASE.key}", f"rqa_{BASE.key}"]
    split = spec(split_kv=True)
    names = [node.name for node in ast.parse(kernel_source(split)).body if isinstance(node, ast.FunctionDef)]
    assert names == ["_reduce", f"angles_{split.key}", f"rqa_{split.key}", f"merge_{split.key}"]


def test_sources_are_cached_by_spec():
    assert kernel_source(BASE) is kernel_source(KernelSpec(64, 64, False, 16, 2, "float32"))


@pytest.mark.parametrize(
    "change",
    [dict(head_dim=128, rotary_dim=128), dict(rotary_dim=32), dict(interleaved=True), dict(block_size=64),
     dict(group=4), dict(dtype="float16"), dict(q_kind="multi"), dict(q_kind="multi", causal=True),
     dict(split_kv=True)],
)
def test_every_spec_field_changes_the_source(change):
    other = spec(**change)
    assert other.key != BASE.key
    assert kernel_source(other) != kernel_source(BASE)


def test_specialisations_are_written_into_the_text():
    half = kernel_source(KernelSpec(128, 96, False, 64, 4, "float16", "multi", True))
    assert "f + 48" in half and "2 * f + 1" not in half  # rotate-half pairs (i, i + F), F = 48
    assert "r = 96 + tl.arange(0, 32)" in half  # pass-through lanes of partial rotary
    assert "q_pos = length - q_len + q_idx" in half and "tl.float16" in half
    inter = kernel_source(KernelSpec(64, 64, True, 1, 1, "float32"))
    assert "2 * f + 1" in inter and "q3 = " not in inter and "q_pos" not in inter
    assert 'input_precision="ieee"' in inter  # float32 never rounds through TF32
    # Pool blocks wider than the key tile are walked in chunks that reuse the block's rotated query.
    wide = kernel_source(KernelSpec(32, 32, False, 100, 1, "float32"))
    assert wide.count("q1r = ") == 1 and wide.count("k1 = tl.load") == 2


def test_interpreter_source_widens_only_bfloat16_matmuls():
    bf16 = KernelSpec(64, 64, False, 16, 2, "bfloat16")
    assert kernel_source(bf16, interpret=True) != kernel_source(bf16, interpret=False)
    assert "tl.dot(q1r, tl.trans(k1))" in kernel_source(bf16, interpret=False)
    fp16 = KernelSpec(64, 64, False, 16, 2, "float16")
    assert kernel_source(fp16, interpret=True) == kernel_source(fp16, interpret=False)


def test_spec_for_reads_the_inputs():
    q = torch.zeros(2, 8, 1, 96, dtype=torch.bfloat16)
    pool = torch.zeros(5, 32, 2, 96, dtype=torch.bfloat16)
    spec = spec_for(q, pool, 48, True, True)
    assert (spec.head_dim, spec.rotary_dim, spec.interleaved, spec.block_size, spec.group, spec.dtype) == (
        96, 48, True, 32, 4, "bfloat16")
    assert spec.q_kind == "decode" and not spec.causal  # a decode query needs no mask
    multi = spec_for(q.expand(2, 8, 5, 96), pool, 48, True, True)
    assert multi.q_kind == "multi" and multi.causal and multi.block_m == 32  # 4 heads x 5 tokens = 20 rows


def test_loaded_kernels_live_in_the_cache_dir():
    from gaugecompile.codegen.cache import load_kernels

    spec = KernelSpec(32, 32, False, 2, 1, "float32")
    module = load_kernels(spec)
    assert load_kernels(spec) is module
    assert module.__file__.startswith(str(cache_dir()))
    assert open(module.__file__).read() == kernel_source(spec)
    assert spec in used_specs()


@pytest.mark.parametrize(
    "bad, match",
    [(dict(head_dim=0), "head_dim"), (dict(rotary_dim=65), "rotary_dim"), (dict(rotary_dim=128), "rotary_dim"),
     (dict(dtype="int8"), "dtype"), (dict(q_kind="prefill"), "q_kind"), (dict(block_m=24), "block_m"),
     (dict(group=32, block_m=16), "block_m"), (dict(block_size=True), "block_size")],
)
def test_bad_specs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        spec(**bad)


def test_kernel_source_wants_a_spec():
    with pytest.raises(TypeError, match="spec"):
        kernel_source("d64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_angle_kernel_reduces_like_rope(dtype):
    """The generated angle kernel gives delta_cos_sin's cos/sin (exact float64 reduction) up to the last ulp."""
    from gaugecompile.codegen.cache import load_kernels

    from gaugecompile.rope import delta_cos_sin

    spec = KernelSpec(64, 48, False, 16, 1, dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 48, 2, dtype=torch.float64) / 48))
    delta = torch.tensor([[0, 1, -1, 2**31 - 1], [-(2**31), 123_456_789, -987_654_321, 2**31 - 12_345]])
    split = inv_freq * float(2**27 + 1)
    hi = split - (split - inv_freq)
    tdt = getattr(torch, dtype)
    cos, sin = torch.empty(2, 4, 24, dtype=tdt), torch.empty(2, 4, 24, dtype=tdt)
    load_kernels(spec).__dict__[f"angles_{spec.key}"][(1,)](delta, hi, inv_freq - hi, cos, sin, 8)
    want_cos, want_sin = delta_cos_sin(delta, inv_freq, torch.float64)
    tol = 1e-14 if dtype == "float64" else 1e-7
    assert float((cos.double() - want_cos).abs().max()) < tol and float((sin.double() - want_sin).abs().max()) < tol


def test_native_source_is_its_template_behind_a_prelude_of_defines():
    """The C++ is a real file shipped with the package; rendering only defines its substitution points in front."""
    from importlib.resources import files

    from gaugecompile.codegen.native_template import TEMPLATE, render_cpp

    template = files("gaugecompile.codegen").joinpath(TEMPLATE).read_text()
    text = render_cpp(KernelSpec(40, 20, True, 4, 2, "float32"))
    prelude = text.removesuffix(template)
    assert prelude != text and "$" not in template
    assert prelude.splitlines()[1:] == ["#define GAUGE_HEAD_DIM 40", "#define GAUGE_NAMESPACE gauge_cpu_d40"]
    assert "constexpr int64_t D = GAUGE_HEAD_DIM;" in template and "#ifndef GAUGE_HEAD_DIM" in template
