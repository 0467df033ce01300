"""Block tables: how the op's mapping names each view token, and the checks of the mapping's values.

The mapping of one sequence is a row of three tables: entry j of its view is slots [0, block_lens[j]) of
physical block block_table[j], rotated by block_delta[j].  Its view is the concatenation of its entries in
order; entries holding 0 tokens are never read.  A plain paged cache (every block full but the last) is
`full_block_lens(seq_lens, ...)`.

Every implementation reads a mapping the same way, so the helpers live here, below both the generated kernels
(`gaugecompile.codegen`) and the ops (`gaugecompile.ops`): views token by token (`view_tokens`, `view_entries`,
`view_slots`), the public `seq_lens` argument as tokens per entry (`as_block_lens`), and the value checks every
kernel makes where it reads the mapping (`check_mapping_values`).
"""

from __future__ import annotations

import weakref

import torch

from .rope import MAX_ABS_DELTA

__all__ = [
    "INDEX_DTYPES", "as_block_lens", "as_deltas", "check_mapping_values", "full_block_lens", "mapping_summary",
    "view_entries", "view_slots", "view_tokens", "whole_deltas",
]

#: dtypes of block ids and token counts.
INDEX_DTYPES = (torch.int32, torch.int64)


def _is_tracing(t: torch.Tensor) -> bool:
    """True where `t` has no values to read: under Dynamo, torch.export, jit tracing, or a fake/meta tensor."""
    # torch internal: no public API tells a fake tensor apart
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or torch.jit.is_tracing() or t.device.type == "meta" or is_fake(t)


def full_block_lens(seq_lens: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    """Tokens per entry [batch, width] of views of `seq_lens` tokens whose blocks are full but the last."""
    start = torch.arange(width, device=seq_lens.device) * block_size
    return (seq_lens.to(torch.int64)[:, None] - start[None, :]).clamp(0, block_size)


def as_block_lens(seq_lens: torch.Tensor, block_table: torch.Tensor, k_pool: torch.Tensor,
                  min_length: int = 0) -> torch.Tensor:
    """The public `seq_lens` argument as tokens per table entry [batch, max_blocks].

    It is either that already, or view lengths [batch] of views whose blocks are full but the last (a plain
    paged cache), which must fit the table and hold at least `min_length` (the queries) tokens."""
    if not isinstance(k_pool, torch.Tensor) or k_pool.dim() != 4:
        got = tuple(k_pool.shape) if isinstance(k_pool, torch.Tensor) else type(k_pool).__name__
        raise ValueError(f"k_pool: expected [num_blocks, block_size, num_kv_heads, head_dim], got {got}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype not in INDEX_DTYPES:
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


def as_deltas(block_delta: torch.Tensor) -> torch.Tensor:
    """Deltas as the angle code takes them: integers as int64, real (learnable) deltas as float64."""
    return block_delta.to(torch.float64 if block_delta.is_floating_point() else torch.int64)


def view_tokens(
    block_table: torch.Tensor, block_delta: torch.Tensor, block_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's view token by token: the flat pool slot (block * block_size + offset) and the delta of each
    (int64, or float64 for real deltas, so a learnable delta keeps its gradient)."""
    offsets = torch.arange(block_size, device=block_table.device)
    held = offsets[None, :] < block_lens.to(torch.int64)[:, None]  # [width, block_size]
    slots = block_table.to(torch.int64)[:, None] * block_size + offsets[None, :]
    return slots[held], as_deltas(block_delta)[:, None].expand(-1, block_size)[held]


def view_entries(block_lens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The table entry of every view token [B, length] and the view position of each entry's first token [B, W].

    Token t belongs to the last entry that starts at or before t, found by marking where entries start and a
    running count (no data-dependent shapes, so it exports); an entry holding no tokens starts where the next one
    does, so the last entry found is never an empty one."""
    lens = block_lens.to(torch.int64)
    start = lens.cumsum(1) - lens
    marks = torch.zeros((lens.shape[0], length + 1), dtype=torch.int64, device=lens.device)
    marks = marks.scatter_add(1, start.clamp(max=length), torch.ones_like(start))
    return marks.cumsum(1)[:, :length] - 1, start


def view_slots(block_table: torch.Tensor, block_delta: torch.Tensor, block_lens: torch.Tensor, block_size: int,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pool slot and delta of every view token, [batch, length] each, for rows holding `length` tokens.

    O(max_blocks + length) and free of data-dependent shapes (it exports), by `view_entries`.
    """
    entry, start = view_entries(block_lens, length)
    offset = torch.arange(length, device=block_lens.device)[None, :] - start.gather(1, entry)
    slots = block_table.to(torch.int64).gather(1, entry) * block_size + offset
    return slots, as_deltas(block_delta).gather(1, entry)


def whole_deltas(block_delta: torch.Tensor) -> torch.Tensor:
    """The deltas as int64: integers as they are, real ones rounded down (their whole part, which bounds where
    angles are exact), with a non-finite value as int64's minimum, so that the range check names it."""
    if not block_delta.is_floating_point():
        return block_delta.to(torch.int64)
    d = block_delta.detach().to(torch.float64)
    d = torch.where(torch.isfinite(d), d, float(torch.iinfo(torch.int64).min))
    return torch.floor(d.clamp(-(2.0**62), 2.0**62)).to(torch.int64)


def mapping_summary(block_table: torch.Tensor, block_delta: torch.Tensor, block_lens: torch.Tensor) -> list[int]:
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
    # torch internal: `Tensor._version` (the in-place edit counter) has no public accessor
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
    lo_n, hi_n, lo, hi, lo_id, hi_id, lo_d, hi_d = mapping_summary(block_table, block_delta, block_lens)
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
