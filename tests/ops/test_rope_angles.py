"""Angles of large integer offsets against an mpmath reference."""

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gaugecompile import RopeSpec
from gaugecompile.rope import delta_cos_sin, reduced_angles

SPECS = [RopeSpec.from_base(10000.0, 128), RopeSpec.from_base(500000.0, 64), RopeSpec.from_base(1e6, 32)]


def _mp_cos_sin(delta: int, theta: float) -> tuple[float, float]:
    with mpmath.workprec(160):
        x = mpmath.mpf(delta) * mpmath.mpf(theta)
        return float(mpmath.cos(x)), float(mpmath.sin(x))


def _max_err(deltas: list[int], spec: RopeSpec, cos: torch.Tensor, sin: torch.Tensor) -> float:
    err = 0.0
    for i, d in enumerate(deltas):
        for j, t in enumerate(spec.inv_freq.tolist()):
            c, s = _mp_cos_sin(d, t)
            err = max(err, abs(c - float(cos[i, j])), abs(s - float(sin[i, j])))
    return err


@pytest.mark.parametrize("spec", SPECS, ids=["llama", "llama3", "qwen"])
def test_angles_near_2_pow_31_match_mpmath(spec):
    deltas = [2**31 - 1, -(2**31), 2**31 - 977, -(2**31) + 12345, 2**30 + 3, 1_000_000]
    cos, sin = delta_cos_sin(torch.tensor(deltas), spec.inv_freq, torch.float64)
    assert _max_err(deltas, spec, cos, sin) < 1e-12
    # float32 cos/sin of the exact angle are within float32 rounding
    cos32, sin32 = delta_cos_sin(torch.tensor(deltas), spec.inv_freq, torch.float32)
    assert _max_err(deltas, spec, cos32, sin32) < 1e-6


def test_float32_product_fails_the_same_check():
    """The check above has teeth: the naive float32 angle is wrong by whole radians at 2^31."""
    spec = SPECS[0]
    deltas = [2**31 - 1, -(2**31), 2**31 - 977]
    angle = torch.tensor(deltas, dtype=torch.float32)[:, None] * spec.inv_freq.float()
    assert _max_err(deltas, spec, torch.cos(angle), torch.sin(angle)) > 1e-2


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8))
def test_reduced_angles_are_in_range_and_exact(deltas):
    spec = SPECS[0]
    angle = reduced_angles(torch.tensor(deltas), spec.inv_freq)
    assert angle.abs().max() <= torch.pi + 1e-12
    cos, sin = torch.cos(angle), torch.sin(angle)
    assert _max_err(deltas, spec, cos, sin) < 1e-12


def test_rope_spec_validates():
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeSpec(torch.ones(4), rotary_dim=6)
    with pytest.raises(ValueError, match="inv_freq"):
        RopeSpec(torch.tensor([]))
    assert RopeSpec(torch.ones(4)).rotary_dim == 8


def test_block_angles_follow_in_place_edits_of_the_same_tensors():
    """The per-forward cache of cos/sin compares values: an in-place edit of the very same deltas is seen, also one
    that bumps no version counter (through `.data`, as gradcheck perturbs its inputs, or a shared numpy array) and
    one of an inference tensor (which has none)."""
    from gaugecompile.rope import block_angles

    inv_freq = RopeSpec.from_base(1e4, 8).inv_freq
    delta = torch.zeros(2, 4, dtype=torch.int64)
    assert block_angles(delta, inv_freq, torch.float32) == (None, None)
    assert block_angles(delta, inv_freq, torch.float32) == (None, None)
    delta[1, 2] = -70_000
    cos, sin = block_angles(delta, inv_freq, torch.float32)
    want_cos, want_sin = delta_cos_sin(delta, inv_freq, torch.float32)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin) and float(sin[1, 2].abs().max()) > 0
    cos64, _ = block_angles(delta, inv_freq, torch.float64)
    assert cos64.dtype == torch.float64
    delta.zero_()
    assert block_angles(delta, inv_freq, torch.float32) == (None, None)
    version = delta._version
    delta.data[0, 0] = 3
    assert delta._version == version and block_angles(delta, inv_freq, torch.float32)[0] is not None
    with torch.inference_mode():
        frozen = torch.full((1, 3), 5, dtype=torch.int64)
        first = block_angles(frozen, inv_freq, torch.float32)
        frozen.fill_(0)
        assert first[0] is not None and block_angles(frozen, inv_freq, torch.float32) == (None, None)
