"""Host side of the generated kernels: exact angles, the split-KV decision, buffers and launches.

Like the native CPU kernel (`native`), `launch` takes the RoPE frequencies `inv_freq` and reduces the angles
exactly (the generated angle kernel, or `gaugecompile.rope` for real-valued deltas) into the one cos and one sin
per table entry that the attention kernel reads.  Every launch goes through `torch.library.wrap_triton`, so the
same code runs eagerly and is visible to Inductor when traced inside the op's `triton_op`
(`gaugecompile.ops.triton_attention`).
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch internal: no public API tells a fake tensor apart
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from gaugecompile.block_tables import check_mapping_values
from gaugecompile.rope import VELTKAMP, accumulation_dtype, delta_cos_sin

from .cache import interpreting, load_kernels
from .spec import KernelSpec, spec_for

__all__ = ["launch", "choose_splits"]

#: A split-KV program should still cover at least this many keys.
MIN_SPLIT_TOKENS = 512
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634


def choose_splits(programs: int, max_blocks: int, block_size: int, device: torch.device) -> int:
    """How many KV splits fill the GPU: enough programs for two waves, each split >= MIN_SPLIT_TOKENS keys.

    Decided from shapes only (never from tensor values), so it is static under tracing.  Off the GPU
    (the interpreter runs programs one after another) there is nothing to fill: 1.
    """
    if device.type != "cuda" or programs <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    by_occupancy = -(-2 * sms // programs)
    by_length = max(1, max_blocks * block_size // MIN_SPLIT_TOKENS)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS, max_blocks))


def launch(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, scale: float, causal: bool, window: int = 0,
    softcap: float = 0.0, num_splits: int = 0,
) -> tuple[Tensor, Tensor]:
    """Run the generated kernels.  num_splits: 0 picks automatically, 1 forces one pass, n > 1 forces n splits.

    The mapping's values are checked first (`check_mapping_values`; a host sync on the GPU)."""
    check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], q.shape[2])
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    max_blocks = block_table.shape[1]
    acc_dtype = accumulation_dtype(q.dtype)
    out = torch.empty((batch, num_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, q_len), dtype=acc_dtype, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    kinds = dict(windowed=window > 0, softcapped=softcap > 0)
    base = spec_for(q, k_pool, rotary_dim, interleaved, causal, **kinds)
    row_tiles = -(-(base.group * q_len) // base.block_m)
    programs = batch * num_kv_heads * row_tiles
    splits = num_splits or choose_splits(programs, max_blocks, k_pool.shape[1], q.device)
    splits = max(1, min(int(splits), max_blocks))
    spec = spec_for(q, k_pool, rotary_dim, interleaved, causal, split_kv=splits > 1, **kinds)
    module = load_kernels(spec)
    kernel = getattr(module, f"rqa_{spec.key}")

    # One cos and one sin per (sequence, block, frequency), from exact float64 angles: O(blocks * F), by a kernel
    # for integer deltas.
    half = rotary_dim // 2
    cos = torch.empty((batch, max_blocks, half), dtype=acc_dtype, device=q.device)
    sin = torch.empty_like(cos)
    theta = inv_freq.to(torch.float64)
    split = theta * VELTKAMP
    theta_hi = split - (split - theta)
    theta_lo = theta - theta_hi
    blocks_per_split = -(-max_blocks // splits)
    if splits > 1:
        part = torch.empty((batch, num_heads, q_len, splits, head_dim), dtype=acc_dtype, device=q.device)
        part_lse = torch.empty((batch, num_heads, q_len, splits), dtype=acc_dtype, device=q.device)
        dst, dst_lse = part, part_lse
        o_strides, l_strides = part.stride(), part_lse.stride()
    else:  # the split index is always 0: its stride is irrelevant
        dst, dst_lse = out, lse
        o_strides, l_strides = (*out.stride()[:3], 0, out.stride(3)), (*lse.stride(), 0)
    if interpreting() and is_fake(q):
        # Shape propagation only: interpreted kernels cannot take fake tensors (on the GPU, wrap_triton
        # turns the launches below into no-ops under fake tensors by itself).
        return out, lse
    # Each entry's count and first view position, each view's length: O(blocks) on the device.
    table = block_table.contiguous()
    counts = block_lens.to(torch.int64).contiguous()
    starts = counts.cumsum(1) - counts
    lengths = counts.sum(1)
    rows = batch * max_blocks
    if block_delta.is_floating_point():  # learnable offsets: whole part reduced exactly plus fraction, in torch
        cos, sin = (t.contiguous() for t in delta_cos_sin(block_delta, inv_freq, acc_dtype))
    else:
        wrap_triton(getattr(module, f"angles_{spec.key}"))[(-(-rows // 32),)](
            block_delta.contiguous(), theta_hi, theta_lo, cos, sin, rows, num_warps=4)
    grid = (batch * num_kv_heads, row_tiles, splits)
    wrap_triton(kernel)[grid](
        q, k_pool, v_pool, table, cos, sin, lengths, counts, starts, dst, dst_lse,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *table.stride(), cos.stride(0), cos.stride(1),
        *o_strides, *l_strides,
        num_kv_heads, q_len, max_blocks, blocks_per_split, float(scale) * _LOG2E, int(window),
        torch.full((1,), float(softcap) * _LOG2E, dtype=acc_dtype, device=q.device),
        num_warps=_num_warps(spec),
    )
    if splits > 1:
        merge = getattr(module, f"merge_{spec.key}")
        wrap_triton(merge)[(batch * num_heads * q_len,)](
            part, part_lse, out, lse, splits, BLOCK_S=1 << (splits - 1).bit_length(), num_warps=4,
        )
    return out, lse


def _num_warps(spec: KernelSpec) -> int:
    tile_elems = max(spec.block_m, spec.block_n) * max(spec.head_dim, 64)
    return 8 if tile_elems >= 64 * 128 else 4
