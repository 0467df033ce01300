"""The rotary basis: `RopeSpec`, exact angles for integer deltas, and rotations.

Every implementation of the op (reference, CPU, Triton, ONNX) takes its cos/sin from
`delta_cos_sin` (or reduces exactly as it does), so they all agree on the angle of an integer delta,
however large; `block_angles` keeps the cos/sin of a mapping's deltas for the layers of one forward.

Why not `delta * inv_freq` in float: at |delta| ~ 2^31 a float32 product has an absolute error of
up to 128 rad and a float64 product of ~2e-7 rad.  Here the product is split into four exact
float64 products (the delta into 16-bit halves, the frequency into two 26-bit halves by
Veltkamp splitting); each is reduced modulo 2*pi with a three-part Cody-Waite constant, whose
first two parts have 24 bits so that `k * C` is exact for every k < 2^29.  The result is accurate
to about 1e-15 rad for -2^31 <= delta < 2^31 (`MAX_ABS_DELTA`) and |inv_freq| <= 1, using only float64 tensor ops, so it
traces, compiles and exports like any other tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mpmath
import torch

__all__ = [
    "RopeSpec", "accumulation_dtype", "reduced_angles", "delta_cos_sin", "block_angles", "rotate", "rotation_tangent",
    "rounded_from", "MAX_ABS_DELTA", "TWO_PI_PARTS", "INV_TWO_PI", "VELTKAMP",
]

#: The one delta bound: every delta lies in [-2^31, 2^31) (an int32), where `reduced_angles` is exact to
#: ~1e-15 rad (measured 1.3e-15 at the bound, |inv_freq| <= 1).  The kernels reject deltas outside it, and
#: ManifoldCache keeps its positions inside it.
MAX_ABS_DELTA = 2**31


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every implementation computes in for inputs of `dtype`: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _two_pi_parts() -> tuple[float, float, float, float]:
    """2*pi as C1 + C2 + C3 (C1, C2 with 24 significant bits), and 1/(2*pi)."""
    with mpmath.workprec(200):
        two_pi = 2 * mpmath.pi
        parts = []
        rest = two_pi
        for _ in range(2):
            m, e = mpmath.frexp(rest)  # rest = m * 2^e, 0.5 <= m < 1
            c = mpmath.ldexp(mpmath.floor(mpmath.ldexp(m, 24)), e - 24)
            parts.append(float(c))
            rest -= c
        parts.append(float(rest))
        return parts[0], parts[1], parts[2], float(1 / two_pi)


_C1, _C2, _C3, _INV_TWO_PI = _two_pi_parts()
#: 2*pi = C1 + C2 + C3 and 1/(2*pi): the reduction constants every kernel must use (Triton, ONNX).
TWO_PI_PARTS: tuple[float, float, float] = (_C1, _C2, _C3)
INV_TWO_PI: float = _INV_TWO_PI
#: Veltkamp splitting factor: theta * VELTKAMP splits a float64 into two 26-bit halves.
VELTKAMP = float(2**27 + 1)


def _reduce(p: torch.Tensor) -> torch.Tensor:
    """p mod 2*pi into [-pi, pi], for exact float64 p with |p| < 2^31."""
    k = torch.round(p * _INV_TWO_PI)
    return ((p - k * _C1) - k * _C2) - k * _C3


def reduced_angles(delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`delta[..., None] * inv_freq` reduced into [-pi, pi], in float64, exact to ~1e-15 rad.

    A floating `delta` (a learnable offset) is its whole part, reduced exactly as an integer is, plus its
    fraction in [0, 1) times the frequency: the angle keeps the integer accuracy, and its gradient with
    respect to `delta` is `inv_freq` (the whole part and the reductions are piecewise constant).
    """
    if delta.is_floating_point():
        whole = torch.floor(delta.detach().to(torch.float64))
        fraction = delta.to(torch.float64) - whole
        theta = inv_freq.to(device=delta.device, dtype=torch.float64)
        return _reduce(reduced_angles(whole.to(torch.int64), theta) + fraction.unsqueeze(-1) * theta)
    delta = delta.to(torch.int64)
    theta = inv_freq.to(device=delta.device, dtype=torch.float64)
    d_hi = ((delta >> 16) << 16).to(torch.float64).unsqueeze(-1)
    d_lo = (delta & 0xFFFF).to(torch.float64).unsqueeze(-1)
    c = theta * VELTKAMP
    t_hi = c - (c - theta)
    t_lo = theta - t_hi
    total = _reduce(d_hi * t_hi) + _reduce(d_hi * t_lo) + _reduce(d_lo * t_hi) + _reduce(d_lo * t_lo)
    return _reduce(total)


def delta_cos_sin(
    delta: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `delta * inv_freq` (shape `delta.shape + (F,)`), computed in float64; differentiable in a
    floating `delta`."""
    angle = reduced_angles(delta, inv_freq)
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


#: The last (block_delta, inv_freq, dtype) -> (cos, sin) of `block_angles`.
_LAST_ANGLES: list = []


def block_angles(
    block_delta: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """cos/sin of every block's delta ([B, width, F] in `dtype`), or (None, None) when every delta is 0.

    Every layer of a forward passes the same mapping, so the exact reduction (`delta_cos_sin`, O(blocks * F)) runs
    once and its result is reused while the deltas and frequencies stay equal in value (compared, never assumed
    from object identity: a cache edits its tables in place).
    """
    if not bool(block_delta.any()):
        return None, None
    if _LAST_ANGLES:
        (delta, freq, cdt), cos_sin = _LAST_ANGLES[0]
        if (cdt == dtype and delta.shape == block_delta.shape and delta.dtype == block_delta.dtype
                and freq.shape == inv_freq.shape and torch.equal(delta, block_delta) and torch.equal(freq, inv_freq)):
            return cos_sin
    cos_sin = delta_cos_sin(block_delta, inv_freq, dtype)
    _LAST_ANGLES[:] = [((block_delta.detach().clone(), inv_freq.clone(), dtype), cos_sin)]
    return cos_sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Apply R(angle) to the last dim of `x`; `cos`/`sin` have F = rotary_dim // 2 in the last dim.

    Rotate-half pairs (i, i + F); interleaved pairs (2i, 2i + 1); dims >= rotary_dim pass through.
    R(-angle) is `rotate(x, cos, -sin, ...)`.
    """
    half = rotary_dim // 2
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if not rest.shape[-1]:
        return out
    return torch.cat((out, rest.expand(*out.shape[:-1], rest.shape[-1])), dim=-1)


def rotation_tangent(x: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """d/dt R(t * inv_freq) x at t = 0: each pair (a, b) becomes inv_freq * (-b, a), dims >= rotary_dim 0.

    A key rotated by delta moves along this tangent as delta grows, so d(key)/d(delta) is the tangent of the
    rotated key: the gradient of a learnable offset is its keys' gradient dotted with it.
    """
    theta = inv_freq.to(device=x.device, dtype=x.dtype)
    out = rotate(x[..., :rotary_dim], torch.zeros_like(theta), theta, rotary_dim, interleaved)
    return torch.nn.functional.pad(out, (0, x.shape[-1] - rotary_dim))


@dataclass(frozen=True)
class RopeSpec:
    """A static rotary basis: frequencies, how many dims rotate, and how pairs are formed.

    `inv_freq` is the per-pair angular frequency (already scaled: linear, NTK, Llama-3, YaRN), negative for a
    model that rotates by -theta (NanoChat: its rotate_half flips the signs);
    `attention_factor` is YaRN's cos/sin multiplier, which the model applies when it rotates and
    which the op therefore never needs (rotations by deltas are pure rotations).
    """

    inv_freq: torch.Tensor
    rotary_dim: int | None = None
    interleaved: bool = False
    attention_factor: float = 1.0
    _key: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        inv = torch.as_tensor(self.inv_freq).detach().to("cpu", torch.float64).reshape(-1).clone()
        if inv.numel() == 0:
            raise ValueError("RopeSpec.inv_freq: expected a non-empty 1-D tensor of frequencies")
        if not torch.isfinite(inv).all():
            raise ValueError("RopeSpec.inv_freq: expected finite frequencies")
        rotary_dim = 2 * inv.numel() if self.rotary_dim is None else int(self.rotary_dim)
        if rotary_dim != 2 * inv.numel():
            raise ValueError(
                f"RopeSpec.rotary_dim: expected 2 * len(inv_freq) = {2 * inv.numel()}, got {rotary_dim}"
            )
        object.__setattr__(self, "inv_freq", inv)
        object.__setattr__(self, "rotary_dim", rotary_dim)
        object.__setattr__(self, "interleaved", bool(self.interleaved))
        object.__setattr__(self, "_key", (tuple(inv.tolist()), rotary_dim, bool(self.interleaved)))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RopeSpec) and self._key == other._key

    @classmethod
    def from_base(cls, base: float, rotary_dim: int, *, interleaved: bool = False) -> RopeSpec:
        """The default RoPE basis: inv_freq[i] = base^(-2i / rotary_dim)."""
        exps = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
        return cls(1.0 / (float(base) ** exps), rotary_dim, interleaved)

    @classmethod
    def none(cls, rotary_dim: int) -> RopeSpec:
        """No rotation (a NoPE layer): zero frequencies, so every rotation is the identity, exactly (cos 0 = 1,
        sin 0 = 0), and an edit that re-rotates other layers' keys leaves this layer's as they are."""
        return cls(torch.zeros(rotary_dim // 2, dtype=torch.float64), rotary_dim)

    @property
    def is_identity(self) -> bool:
        """Whether every rotation in this basis is the identity (a NoPE layer)."""
        return not bool(self.inv_freq.any())

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at integer positions (exact angles), shape `positions.shape + (rotary_dim // 2,)`."""
        return delta_cos_sin(positions, self.inv_freq, dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x[..., n, head_dim]` to integer `positions[..., n]` (broadcast over heads by the caller)."""
        cos, sin = self.cos_sin(positions, accumulation_dtype(x.dtype))
        return rotate(x.to(cos.dtype), cos, sin, self.rotary_dim, self.interleaved).to(x.dtype)


def rounded_from(values: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether `values` are `basis`'s frequencies (float64) rounded to `dtype` (default: `values`' own): within one
    spacing of the dtype at each magnitude (what one or two roundings can move a value), subnormals included."""
    if values.numel() != basis.numel():
        return False
    info = torch.finfo(dtype or values.dtype)
    got = values.detach().reshape(-1).to("cpu", torch.float64)
    want = basis.detach().reshape(-1).to("cpu", torch.float64)
    spacing = torch.clamp(want.abs(), min=info.smallest_normal) * info.eps
    return bool(((got - want).abs() <= spacing).all())
