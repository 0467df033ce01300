"""`KernelSpec`: everything a generated kernel is specialised on, and how to read it off the inputs.

One spec is one generated source file.  Shapes that only change how many programs run (batch,
number of heads, pool size, query length within a kind, context length) are runtime arguments;
what changes the code (widths of the register tiles, rotary layout, GQA group, dtype, causal
masking, split-KV stores) is in the spec and baked into the text as literals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KernelSpec", "spec_for", "DTYPES"]

#: dtypes the kernels are generated for, by their torch name.
DTYPES = ("float16", "bfloat16", "float32", "float64")
Q_KINDS = ("decode", "multi")

#: Rows (query head x query token) of one program for multi-token queries; keys per inner step.
MAX_BLOCK_M = 64
MAX_BLOCK_N = 64
#: tl.dot needs every dimension >= 16 on the GPU.
MIN_TILE = 16


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile(n: int, cap: int | None = None) -> int:
    """Smallest power of two >= n and >= MIN_TILE (capped at `cap`)."""
    width = max(MIN_TILE, _pow2(n))
    return min(width, cap) if cap is not None else width


@dataclass(frozen=True)
class KernelSpec:
    """A specialisation of the rotated-query attention kernel.

    q_kind "decode": one query token per sequence (the GQA group fills the rows, no causal mask
    is needed since the query sits at the end of its view); "multi": several query tokens, rows
    are (token, head-in-group) pairs tiled by `block_m`, with a bottom-right causal mask when
    `causal`.  `windowed`: a sliding window (its width a run-time argument) hides the keys before each
    query's window, and entries wholly before the tile's windows are skipped.  `softcapped`: the scores are
    capped to c * tanh(s / c) (c a run-time argument) before the masks.  `split_kv`: the kernel
    writes per-split partial results and a second kernel merges them by log-sum-exp (flash-decoding).
    `block_n` is the number of keys per inner step (a pool block wider than that is walked in chunks
    with the same rotated query).
    """

    head_dim: int
    rotary_dim: int
    interleaved: bool
    block_size: int
    group: int
    dtype: str
    q_kind: str = "decode"
    causal: bool = False
    split_kv: bool = False
    block_m: int = 0
    block_n: int = 0
    windowed: bool = False
    softcapped: bool = False

    def __post_init__(self) -> None:
        for name in ("head_dim", "rotary_dim", "block_size", "group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KernelSpec.{name}: expected a positive int, got {value!r}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"KernelSpec.rotary_dim: expected an even number <= head_dim={self.head_dim}, got {self.rotary_dim}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"KernelSpec.dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if self.q_kind not in Q_KINDS:
            raise ValueError(f"KernelSpec.q_kind: expected one of {Q_KINDS}, got {self.q_kind!r}")
        object.__setattr__(self, "interleaved", bool(self.interleaved))
        object.__setattr__(self, "split_kv", bool(self.split_kv))
        object.__setattr__(self, "windowed", bool(self.windowed))
        object.__setattr__(self, "softcapped", bool(self.softcapped))
        # A decode query is the last token of its view: the causal mask is a no-op there.
        object.__setattr__(self, "causal", bool(self.causal) and self.q_kind == "multi")
        block_m = self.block_m or tile(self.group, None if self.q_kind == "decode" else MAX_BLOCK_M)
        block_n = self.block_n or tile(self.block_size, MAX_BLOCK_N)
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if value < MIN_TILE or value & (value - 1):
                raise ValueError(f"KernelSpec.{name}: expected a power of two >= {MIN_TILE}, got {value}")
        if self.q_kind == "decode" and block_m < self.group:
            raise ValueError(f"KernelSpec.block_m: a decode kernel needs block_m >= group={self.group}, got {block_m}")
        object.__setattr__(self, "block_m", block_m)
        object.__setattr__(self, "block_n", block_n)

    @property
    def key(self) -> str:
        """A readable, unique name for this specialisation (used for cache files and kernel names)."""
        parts = [
            f"d{self.head_dim}", f"r{self.rotary_dim}", "il" if self.interleaved else "rh", f"bs{self.block_size}",
            f"g{self.group}", {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}[self.dtype],
            self.q_kind + ("_causal" if self.causal else "") + ("_window" if self.windowed else "")
            + ("_cap" if self.softcapped else ""),
            "split" if self.split_kv else "single",
            f"m{self.block_m}", f"n{self.block_n}",
        ]
        return "_".join(parts)


def spec_for(
    q: torch.Tensor, k_pool: torch.Tensor, rotary_dim: int, interleaved: bool, causal: bool, *, split_kv: bool = False,
    windowed: bool = False, softcapped: bool = False,
) -> KernelSpec:
    """The spec of the kernel that serves these inputs (q [B, H, Q, D], k_pool [N, bs, Hkv, D])."""
    _, num_heads, q_len, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    dtype = str(q.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise TypeError(f"q: expected one of the dtypes {DTYPES}, got {q.dtype}")
    group = int(num_heads) // int(num_kv_heads)
    q_kind = "decode" if int(q_len) == 1 else "multi"
    return KernelSpec(int(head_dim), int(rotary_dim), bool(interleaved), int(block_size), group, dtype,
                      q_kind, bool(causal), bool(split_kv),
                      block_m=0 if q_kind == "decode" else tile(group * int(q_len), MAX_BLOCK_M), windowed=windowed,
                      softcapped=softcapped)
