"""`gauge::rotated_query_attention`: the torch.library op, its fake kernel, autograd, public entry.

Schema (the contract the passes, the codegen and the ONNX export rely on):

    rotated_query_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table,
        Tensor block_delta, Tensor block_lens, Tensor inv_freq, int rotary_dim, bool interleaved,
        float scale, bool causal, int window=0, float softcap=0.0, Tensor? k_scale=None,
        Tensor? v_scale=None) -> (Tensor out, Tensor lse)

Entry j of row b is slots [0, block_lens[b, j]) of block block_table[b, j], rotated by block_delta[b, j];
a row's view is its entries in order (`gaugecompile.block_tables` says it in code), so an edit off block boundaries
shortens or starts an entry instead of moving the tokens after it.  Query t sits at view position
p = length - q_len + t; `causal` hides the keys after p, a sliding `window` W > 0 the keys at p - W and before
(`masks.hidden_keys`), and the kernels skip the blocks no query sees; `softcap` c > 0 caps the scaled
scores to c * tanh(s / c) before the mask (Gemma 2's logit soft-capping).  `inv_freq` is float64 `[rotary_dim // 2]`.
The pools hold any KV format of `gaugecompile.kv_format` (float, or int8/float8/int4 codes with `k_scale`/`v_scale`
beside them under the same block ids), read and dequantized in registers with float32 accumulation, whatever q's
float dtype.
`lse` is `[batch, num_heads, q_len]`, float32
(float64 for float64 inputs).  The CPU kernel is the generated native code (`gaugecompile.codegen.native`,
compiled on first use), or the torch loop of `paged_attention` where no C++ compiler exists; the CUDA
kernel is the generated Triton code (`triton_attention`, over `gaugecompile.codegen`).  Both take
`inv_freq` and reduce the angles exactly (`gaugecompile.rope`) before their kernels read one cos and one sin
per entry.  Gradients (q, k_pool, v_pool, and block_delta where it is real-valued: a learnable delta, whose
angle is `delta * inv_freq`) come from a backward op with the explicit adjoint (`attention_backward`), shared
by every implementation.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..block_tables import as_block_lens
from ..codegen.native import native_attention, native_available
from ..rope import RopeSpec, accumulation_dtype
from .attention_backward import op_gradients
from .checks import check_attention_inputs
from .counters import runs
from .paged_attention import paged_attention
from .reference import reference_attention

__all__ = ["rotated_query_attention", "IMPLS"]

IMPLS = ("auto", "native", "loop", "triton", "reference")


def cpu_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, scale: float, causal: bool, window: int = 0,
    softcap: float = 0.0, k_scale: Tensor | None = None, v_scale: Tensor | None = None, *,
    native: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """The CPU kernel: native code when it can be built (`native=None`), else (or with `native=False`) the loop.

    The native kernel reads the pools in place, so it needs unit stride along head_dim; a pool without it
    takes the loop, which handles any strides.
    """
    if native is None:
        native = native_available() and k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1
    kernel = native_attention if native else paged_attention
    return kernel(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved, scale,
                  causal, window, softcap, k_scale, v_scale)


@torch.library.custom_op("gauge::rotated_query_attention", mutates_args=())
def _rqa_op(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, scale: float, causal: bool, window: int = 0,
    softcap: float = 0.0, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    runs["kernel"] += 1
    if q.device.type == "cuda":
        from .triton_attention import triton_attention  # on first use: it imports Triton

        return triton_attention(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq,
                                rotary_dim, interleaved, scale, causal, window, softcap, k_scale, v_scale)
    return cpu_attention(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved,
                         scale, causal, window, softcap, k_scale, v_scale)


@_rqa_op.register_fake
def _rqa_fake(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved,
              scale, causal, window=0, softcap=0.0, k_scale=None, v_scale=None):
    # the kernels return contiguous outputs whatever q's strides are; the fake must say the same
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.attrs = inputs[7:]


def _backward(ctx, grad_out, grad_lse):
    return *op_gradients(ctx.saved_tensors, ctx.attrs, grad_out, grad_lse), *(None,) * len(ctx.attrs)


_rqa_op.register_autograd(_backward, setup_context=_setup_context)


class _Implementation(torch.autograd.Function):
    """One implementation's forward (`impl` "native", "loop" or "triton") with the op's adjoint, so each is
    differentiable through the public entry and `gradcheck` of each tests its forward against that adjoint."""

    @staticmethod
    def forward(ctx, forward, q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim,
                interleaved, scale, causal, window, softcap, k_scale, v_scale):
        ctx.save_for_backward(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq)
        ctx.attrs = (rotary_dim, interleaved, scale, causal, window, softcap, k_scale, v_scale)
        return forward(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved,
                       scale, causal, window, softcap, k_scale, v_scale)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return None, *op_gradients(ctx.saved_tensors, ctx.attrs, grad_out, grad_lse), *(None,) * len(ctx.attrs)


def rotated_query_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    block_table: Tensor,
    block_delta: Tensor,
    seq_lens: Tensor,
    rope: RopeSpec,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    impl: str = "auto",
    return_lse: bool = False,
):
    """Attention of rotated queries over a static block pool, rotating the query per block instead
    of moving or re-rotating keys.

    q: [batch, num_heads, q_len, head_dim], rotated at its own logical positions (the last q_len
    tokens of each view). k_pool/v_pool: [num_blocks, block_size, num_kv_heads, head_dim], keys
    stored rotated at their write positions. block_table/block_delta: [batch, max_blocks];
    seq_lens: tokens per table entry [batch, max_blocks] (entry j holds slots [0, n) of its block), or
    view lengths [batch] of views whose blocks are full but the last.  window: W > 0 limits each query to
    its last W view tokens, itself included (a sliding-window layer); blocks before every query's window are
    not read.  softcap: c > 0 caps the scaled scores to c * tanh(s / c) (logit soft-capping).  k_scale/v_scale: the
    scales beside compressed pools (`gaugecompile.kv_format`; `kv_format.quantize` makes both), None for float pools.
    impl: "auto" (the registered op: native CPU kernel, Triton on CUDA), "native"
    (the generated C++ kernel, CPU only), "loop" (the torch loop, the fallback where no compiler exists, on
    any device), "triton" (generated kernels; on the CPU only under TRITON_INTERPRET=1), "reference"
    (gather + re-rotate + softmax).
    """
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope: expected a gaugecompile.RopeSpec, got {type(rope).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return reference_attention(q, k_pool, v_pool, block_table, block_delta, seq_lens, rope, scale=scale,
                                   causal=causal, window=window, softcap=softcap, k_scale=k_scale, v_scale=v_scale,
                                   return_lse=return_lse)
    q_len = q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else 0
    block_lens = as_block_lens(seq_lens, block_table, k_pool, q_len)
    check_attention_inputs(q, k_pool, v_pool, block_table, block_delta, block_lens, rope.rotary_dim, window, softcap,
                           k_scale, v_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (q, k_pool, v_pool, block_table, block_delta, block_lens, rope.inv_freq.to(q.device),
            rope.rotary_dim, rope.interleaved, scale, bool(causal), window, float(softcap), k_scale, v_scale)
    if impl == "auto":
        out, lse = torch.ops.gauge.rotated_query_attention(*args)
    elif impl in ("native", "loop"):
        if impl == "native" and q.device.type != "cpu":
            raise ValueError(f"impl: 'native' is the CPU kernel, got tensors on {q.device}")
        out, lse = _Implementation.apply(functools.partial(cpu_attention, native=impl == "native"), *args)
    else:
        from .triton_attention import triton_attention  # on first use: it imports Triton

        out, lse = _Implementation.apply(triton_attention, *args)
    return (out, lse) if return_lse else out
