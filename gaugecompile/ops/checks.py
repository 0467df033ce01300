"""Input validation for the rotated-query op: clear errors that name the argument.

Shape, dtype and device checks run at the op's entry (they are static under tracing); checks that
read tensor values (block ids, lengths, delta range) run in the kernels, where the values are read, so
they also guard compiled graphs and exported programs.
"""

from __future__ import annotations

import weakref

import torch

from ..rope import MAX_ABS_DELTA

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)
#: Deltas are integers, or real numbers where offsets are learnt (`gaugecompile.rope.reduced_angles`).
_DELTAS = (*_INTS, torch.float32, torch.float64)


def _is_tracing(t: torch.Tensor) -> bool:
    """True where `t` has no values to read: under Dynamo, torch.export, jit tracing, or a fake/meta tensor."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or torch.jit.is_tracing() or t.device.type == "meta" or is_fake(t)


def check_attention_inputs(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    block_delta: torch.Tensor,
    block_lens: torch.Tensor,
    rotary_dim: int,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """Raise TypeError/ValueError naming the first argument that breaks the op's contract."""
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("block_table", block_table),
                    ("block_delta", block_delta), ("block_lens", block_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q: expected [batch, num_heads, q_len, head_dim], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4:
        raise ValueError(
            f"k_pool: expected [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(k_pool.shape)}"
        )
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool: expected the shape of k_pool {tuple(k_pool.shape)}, got {tuple(v_pool.shape)}")
    batch, num_heads, q_len, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, pool_dim = k_pool.shape
    if q.dtype not in _FLOATS:
        raise TypeError(f"q: expected a floating dtype {_FLOATS}, got {q.dtype}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("block_table", block_table),
                    ("block_delta", block_delta), ("block_lens", block_lens)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
    if pool_dim != head_dim:
        raise ValueError(f"k_pool: head_dim {pool_dim} does not match q's head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"q: num_heads ({num_heads}) must be a multiple of k_pool's num_kv_heads ({num_kv_heads})"
        )
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected [batch={batch}, max_blocks], got shape {tuple(block_table.shape)}")
    if block_table.dtype not in _INTS:
        raise TypeError(f"block_table: expected an int32/int64 tensor, got {block_table.dtype}")
    if block_delta.shape != block_table.shape:
        raise ValueError(
            f"block_delta: expected the shape of block_table {tuple(block_table.shape)}, got {tuple(block_delta.shape)}"
        )
    if block_delta.dtype not in _DELTAS:
        raise TypeError(f"block_delta: expected an int32/int64 tensor (or float32/float64 for learnable offsets), "
                        f"got {block_delta.dtype}")
    if block_lens.shape != block_table.shape:
        raise ValueError(
            f"block_lens: expected the shape of block_table {tuple(block_table.shape)}, got {tuple(block_lens.shape)}"
        )
    if block_lens.dtype not in _INTS:
        raise TypeError(f"block_lens: expected an int32/int64 tensor, got {block_lens.dtype}")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rope.rotary_dim: expected an even number in (0, head_dim={head_dim}], got {rotary_dim}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected an int >= 0 (0: no sliding window), got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < float("inf"):
        raise ValueError(f"softcap: expected a finite number >= 0 (0: no logit soft-capping), got {softcap!r}")


def as_block_lens(seq_lens: torch.Tensor, block_table: torch.Tensor, k_pool: torch.Tensor,
                  min_length: int = 0) -> torch.Tensor:
    """The public `seq_lens` argument as tokens per table entry [batch, max_blocks].

    It is either that already, or view lengths [batch] of views whose blocks are full but the last (a plain
    paged cache), which must fit the table and hold at least `min_length` (the queries) tokens."""
    from .reference import full_block_lens

    if not isinstance(k_pool, torch.Tensor) or k_pool.dim() != 4:
        got = tuple(k_pool.shape) if isinstance(k_pool, torch.Tensor) else type(k_pool).__name__
        raise ValueError(f"k_pool: expected [num_blocks, block_size, num_kv_heads, head_dim], got {got}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype not in _INTS:
        got = seq_lens.dtype if isinstance(seq_lens, torch.Tensor) else type(seq_lens).__name__
        raise TypeError(f"seq_lens: expected an int32/int64 tensor, got {got}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise ValueError(f"block_table: expected [batch, max_blocks], got {got}")
    if seq_lens.dim() == 2:
        return seq_lens
    if seq_lens.shape != block_table.shape[:1]:
        raise ValueError(f"seq_lens: expected [batch={block_table.shape[0]}] view lengths or [batch, max_blocks] "
                         f"tokens per block, got shape {tuple(seq_lens.shape)}")
    width, block_size = block_table.shape[1], k_pool.shape[1]
    if not _is_tracing(seq_lens) and seq_lens.numel():
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < min_length or hi > width * block_size:
            raise ValueError(f"seq_lens: expected values in [{min_length}, max_blocks*block_size="
                             f"{width * block_size}], got min {lo}, max {hi}")
    return full_block_lens(seq_lens, width, block_size)


def whole_deltas(block_delta: torch.Tensor) -> torch.Tensor:
    """The deltas as int64: integers as they are, real ones rounded down (their whole part, which bounds where
    angles are exact), with a non-finite value as int64's minimum, so that the range check names it."""
    if not block_delta.is_floating_point():
        return block_delta.to(torch.int64)
    d = block_delta.detach().to(torch.float64)
    d = torch.where(torch.isfinite(d), d, float(torch.iinfo(torch.int64).min))
    return torch.floor(d.clamp(-(2.0**62), 2.0**62)).to(torch.int64)


def _mapping_summary(block_table: torch.Tensor, block_delta: torch.Tensor, block_lens: torch.Tensor) -> list[int]:
    """[min count, max count, min row total, max row total, min id, max id, min delta, max delta] of a mapping,
    ids and deltas over the entries holding tokens only: one device-to-host transfer (one sync on a GPU)."""
    lens = block_lens.to(torch.int64)
    used = lens > 0
    top, bottom = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
    rows = lens.sum(1)
    ids, deltas = block_table.to(torch.int64), whole_deltas(block_delta)
    return torch.stack([
        lens.min(), lens.max(), rows.min(), rows.max(),
        torch.where(used, ids, top).min(), torch.where(used, ids, bottom).max(),
        torch.where(used, deltas, top).min(), torch.where(used, deltas, bottom).max(),
    ]).tolist()


#: The mapping most recently found valid: weak references to its tensors with their versions, and the bounds
#: it was checked against.  Every layer of a forward passes the same tensors, so they are read once a forward.
_LAST_VALID: list = []


def _key(tensors: tuple[torch.Tensor, ...], bounds: tuple) -> tuple | None:
    if any(t.is_inference() for t in tensors):  # no version counter to tell an in-place edit
        return None
    return tuple((weakref.ref(t), t._version) for t in tensors) + bounds


def _same(key: tuple, tensors: tuple[torch.Tensor, ...], bounds: tuple) -> bool:
    refs, rest = key[: len(tensors)], key[len(tensors):]
    return rest == bounds and all(ref() is t and version == t._version
                                  for (ref, version), t in zip(refs, tensors, strict=True))


def check_mapping_values(
    block_table: torch.Tensor, block_delta: torch.Tensor, block_lens: torch.Tensor, num_blocks: int,
    block_size: int, min_length: int = 0, length: int | None = None,
) -> None:
    """Raise ValueError naming the argument when the mapping's values break the op's contract: a count outside
    [0, block_size], a view shorter than `min_length` (the queries) or other than `length` (where the op has
    one view length), a used block id outside [0, num_blocks), a used delta outside [-2^31, 2^31)
    (`MAX_ABS_DELTA`, where angles are exact).  Entries holding no tokens are never read.

    Every kernel runs these checks where it reads the mapping (the native kernel in C++), so they hold for
    compiled graphs and exported programs too; under tracing (fake or meta tensors) there are no values.  The
    values are read in one transfer, and not again while the same tensors (unmodified: same version) come back
    with the same bounds -- the other layers of a forward.
    """
    if _is_tracing(block_table) or not block_lens.numel():
        return
    tensors, bounds = (block_table, block_delta, block_lens), (num_blocks, block_size, min_length, length)
    if _LAST_VALID and _LAST_VALID[0] is not None and _same(_LAST_VALID[0], tensors, bounds):
        return
    lo_n, hi_n, lo, hi, lo_id, hi_id, lo_d, hi_d = _mapping_summary(block_table, block_delta, block_lens)
    if lo_n < 0 or hi_n > block_size:
        raise ValueError(f"block_lens: expected token counts in [0, block_size={block_size}], got min {lo_n}, "
                         f"max {hi_n}")
    if length is not None and (lo != length or hi != length):
        raise ValueError(f"block_lens: every row must hold length={length} tokens, got min {lo}, max {hi}")
    if lo < min_length:
        raise ValueError(f"block_lens: every row must hold at least the {min_length} query tokens, got {lo}")
    if hi_n > 0 and (lo_id < 0 or hi_id >= num_blocks):
        raise ValueError(f"block_table: block ids must lie in [0, num_blocks={num_blocks}), got min {lo_id}, "
                         f"max {hi_id}")
    if hi_n > 0 and (lo_d < -MAX_ABS_DELTA or hi_d >= MAX_ABS_DELTA):
        raise ValueError(f"block_delta: expected -2^31 <= delta < 2^31, finite (where angles are exact), "
                         f"got min {lo_d}, max {hi_d}")
    _LAST_VALID[:] = [_key(tensors, bounds)]
