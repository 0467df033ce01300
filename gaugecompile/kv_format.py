"""KV pool formats: how a pool stores its keys and values, and the one definition of (de)quantizing them.

A pool `[num_blocks, block_size, kv_heads, width]` holds one row per token and KV head.  Float formats (float64,
float32, bfloat16, float16) store the rows as they are.  Compressed formats store codes and, beside the pool, a
*scale* tensor `[num_blocks, block_size, kv_heads, groups]` indexed by the same block ids, so whatever an edit
does to a block table (delete, splice, window, reorder, fork) it moves neither codes nor scales:

- ``int8``: codes in [-127, 127], scale = max|x| / 127 of the group;
- ``float8_e4m3fn``: codes are float8 e4m3fn values in [-448, 448], scale = max|x| / 448;
- ``int4``: codes in [-8, 7] packed two per byte (torch.uint8, width head_dim / 2), scale = the group's value of
  largest magnitude / -8 (as llama.cpp's Q4_0: that value is code -8 exactly, the other 15 codes cover the rest).

A group is GROUP = 32 consecutive channels of one token's head row (the whole row where head_dim is not a multiple
of 32).  Why per token and group: a pool is written one token at a time and never rewritten (keys are never
re-rotated), so a scale must be known when its token is written; a per-channel scale over a block (KIVI) would
have to wait for the block to fill.  32 channels keeps an outlier channel of a key from flattening the other 31
(llama.cpp's q8_0/q4_0 choice); the quality benchmark (`gaugecompile bench --only 11`) measures it.  Scales are
bfloat16: a code (at most 8 significant bits) times a bfloat16 scale (8 bits) is exact in float32, so every
implementation dequantizes to the same float32 values whatever order it multiplies in, and bfloat16 has float32's
range (no scale overflows or flushes to zero where float16's would).  Within int4's packed bytes, byte i of a group
holds channel i of the group in its low nibble and channel i + GROUP / 2 in its high nibble (code + 8).

`quantize` and `dequantize` are the definition; every kernel's in-register dequantization is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GROUP", "KVFormat", "FORMATS", "SCALE_DTYPE", "kv_format", "format_of", "group_size", "quantize",
           "dequantize", "dequantized_pools"]

GROUP = 32
SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class KVFormat:
    """One pool format: its name (the `kv_dtype` users pass), the pool tensor's dtype, whether scales go beside it,
    the largest code magnitude, and how many channels one pool element packs."""

    name: str
    storage: torch.dtype
    scaled: bool = False
    qmax: float = 0.0
    packing: int = 1

    def pool_width(self, head_dim: int) -> int:
        """The pool's last dim for rows of `head_dim` channels."""
        return head_dim // self.packing

    def head_dim(self, pool_width: int) -> int:
        """The head dim of a pool whose last dim is `pool_width`."""
        return pool_width * self.packing

    def groups(self, head_dim: int) -> int:
        """Scales per row (0 for float formats)."""
        return head_dim // group_size(head_dim) if self.scaled else 0

    def bytes_per_row(self, head_dim: int) -> int:
        """Bytes one token's head row takes, scales included."""
        itemsize = torch.empty((), dtype=self.storage).element_size()
        return self.pool_width(head_dim) * itemsize + self.groups(head_dim) * SCALE_DTYPE.itemsize

    def check_head_dim(self, head_dim: int, name: str = "head_dim") -> None:
        """ValueError naming `name` when this format cannot hold rows of `head_dim` channels."""
        if self.packing > 1 and group_size(head_dim) % 2:
            raise ValueError(f"{name}: kv_dtype {self.name!r} packs two channels a byte within groups of "
                             f"{group_size(head_dim)}; expected an even head dim, got {head_dim}")


FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("float64", torch.float64),
    KVFormat("float32", torch.float32),
    KVFormat("bfloat16", torch.bfloat16),
    KVFormat("float16", torch.float16),
    KVFormat("int8", torch.int8, True, 127.0),
    KVFormat("float8_e4m3fn", torch.float8_e4m3fn, True, 448.0),
    KVFormat("int4", torch.uint8, True, 8.0, 2),
)}
_BY_STORAGE = {f.storage: f for f in FORMATS.values()}


def kv_format(kv_dtype: str | torch.dtype, name: str = "kv_dtype") -> KVFormat:
    """The format a user names, by string ("int8", "int4", ...) or torch dtype; ValueError naming `name` else."""
    if isinstance(kv_dtype, KVFormat):
        return kv_dtype
    key = str(kv_dtype).removeprefix("torch.") if isinstance(kv_dtype, (str, torch.dtype)) else None
    if key not in FORMATS or (isinstance(kv_dtype, torch.dtype) and kv_dtype == torch.uint8):
        raise ValueError(f"{name}: expected one of {list(FORMATS)} (or the torch dtype of a float or int8/float8 "
                         f"one), got {kv_dtype!r}")
    return FORMATS[key]


def format_of(pool: torch.Tensor, scale: torch.Tensor | None, name: str = "k_pool") -> KVFormat:
    """The format of a pool tensor and its scales (None for float pools); TypeError/ValueError naming the argument."""
    fmt = _BY_STORAGE.get(pool.dtype)
    if fmt is None:
        raise TypeError(f"{name}: expected a pool of one of the KV formats {[f.storage for f in FORMATS.values()]}, "
                        f"got {pool.dtype}")
    scale_name = name.replace("pool", "scale")
    if not fmt.scaled:
        if scale is not None:
            raise ValueError(f"{scale_name}: a {pool.dtype} pool has no scales, got a tensor")
        return fmt
    if scale is None:
        raise ValueError(f"{scale_name}: the {fmt.name} pool needs its scales [num_blocks, block_size, kv_heads, "
                         f"groups], got None")
    head_dim = fmt.head_dim(pool.shape[-1]) if pool.dim() == 4 else 0
    want = (*pool.shape[:3], fmt.groups(head_dim)) if head_dim else None
    if scale.dtype != SCALE_DTYPE or want is None or tuple(scale.shape) != want or scale.device != pool.device:
        raise ValueError(f"{scale_name}: expected {SCALE_DTYPE} scales of shape {want} on {pool.device} beside "
                         f"{name}, got {scale.dtype} {tuple(scale.shape)} on {scale.device}")
    return fmt


def group_size(head_dim: int) -> int:
    """Channels per scale: GROUP where it divides the head dim, else the whole row."""
    return GROUP if head_dim % GROUP == 0 else head_dim


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows x [..., head_dim] as the pool stores them: (codes, scales [..., groups]) or (x in the format, None)."""
    if not fmt.scaled:
        return x.to(fmt.storage), None
    head_dim = x.shape[-1]
    fmt.check_head_dim(head_dim, "key_states")
    g = group_size(head_dim)
    xs = x.detach().float().unflatten(-1, (head_dim // g, g))  # codes and their scales carry no gradient
    if fmt.name == "int4":  # the value of largest magnitude becomes code -8
        picked = xs.gather(-1, xs.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = (picked / -fmt.qmax).to(SCALE_DTYPE)
    else:
        scale = (xs.abs().amax(-1) / fmt.qmax).to(SCALE_DTYPE)
    s = scale.float()[..., None]
    scaled = torch.where(s != 0, xs / torch.where(s != 0, s, 1.0), 0.0)
    if fmt.name == "int8":
        codes = scaled.round().clamp(-127, 127).to(torch.int8)
    elif fmt.name == "float8_e4m3fn":
        codes = scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    else:
        nibbles = (scaled.round().clamp(-8, 7) + 8).to(torch.uint8)  # [..., groups, g]
        codes = nibbles[..., : g // 2] | (nibbles[..., g // 2:] << 4)
    return codes.flatten(-2), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored rows back as values [..., head_dim] in `dtype` (exact float32 products of codes and scales)."""
    if scale is None:
        return codes.to(dtype)
    groups = scale.shape[-1]
    if codes.dtype == torch.uint8:  # int4: low nibbles are a group's first half, high nibbles its second
        packed = codes.unflatten(-1, (groups, -1))
        values = torch.cat([(packed & 15), (packed >> 4)], -1).to(torch.float32) - 8
    else:
        values = codes.to(torch.float32).unflatten(-1, (groups, -1))
    return (values * scale.float()[..., None]).flatten(-2).to(dtype)


def dequantized_pools(k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor | None,
                      v_scale: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both pools as values in `dtype` (the reference's first step: O(pool), never on a fast path)."""
    return dequantize(k_pool, k_scale, dtype), dequantize(v_pool, v_scale, dtype)
