"""`gauge::rotated_query_attention_triton`: the generated Triton kernels as a `torch.library.triton_op`.

A `triton_op` (unlike an opaque custom op) lets torch.compile / Inductor see the Triton kernels
inside it (`gaugecompile.codegen.launcher` launches them).  Its gradients reuse the core op's backward
(`gauge::rotated_query_attention_backward`).  Importing this module imports Triton, so the op is
registered on first use (`attention` imports it lazily).
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch internal: no public API names the mode under which AOTAutograd functionalises a graph
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op

from ..codegen.cache import interpreting
from ..codegen.launcher import launch
from .attention_backward import op_gradients

__all__ = ["triton_attention"]


@triton_op("gauge::rotated_query_attention_triton", mutates_args=())
def _rqa_triton(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, scale: float, causal: bool, window: int, softcap: float,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    return launch(q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, rotary_dim, interleaved, scale,
                  causal, window, softcap, num_splits)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.attrs = inputs[7:13]  # rotary_dim, interleaved, scale, causal, window, softcap


def _backward(ctx, grad_out, grad_lse):
    return *op_gradients(ctx.saved_tensors, ctx.attrs, grad_out, grad_lse), *(None,) * 7


_rqa_triton.register_autograd(_backward, setup_context=_setup_context)

# Under TRITON_INTERPRET=1 the kernels are interpreted functions that no tracer can capture, so
# AOTAutograd must keep the op whole (it runs eagerly inside the compiled graph) instead of
# decomposing it into kernel calls; on the GPU the usual decomposition makes the kernels visible.
# torch internal: `_torch_dispatch_fns` is the only way to reach the decomposition `triton_op` registered (no
# public API returns a registered torch_dispatch rule).
_decompose = _rqa_triton._torch_dispatch_fns.get(FunctionalTensorMode)


@_rqa_triton.register_torch_dispatch(FunctionalTensorMode)
def _functional(mode, op, types, args, kwargs):
    if interpreting() or _decompose is None:
        return mode.__torch_dispatch__(op, types, args, kwargs)
    return _decompose(mode, op, types, args, kwargs)


def triton_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, scale: float, causal: bool, window: int = 0,
    softcap: float = 0.0, k_scale: Tensor | None = None, v_scale: Tensor | None = None, *,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Rotated-query attention through the generated Triton kernels: (out in q's dtype, lse [B, H, Q]).

    Same semantics as `torch.ops.gauge.rotated_query_attention`; inputs are validated by the caller.
    On the CPU it needs TRITON_INTERPRET=1 (set before triton is imported).  `num_splits`: None
    chooses the split-KV factor from the shapes and the GPU, 1 forbids splitting, n > 1 forces n.
    """
    if k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale: the Triton kernels read float pools only; a {k_pool.dtype} (compressed) pool runs "
                         "on the CPU kernels")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits: expected None or a positive int, got {num_splits!r}")
    return torch.ops.gauge.rotated_query_attention_triton(
        q, k_pool, v_pool, block_table, block_delta, block_lens, inv_freq, int(rotary_dim), bool(interleaved),
        float(scale), bool(causal), int(window), float(softcap), int(num_splits or 0))
