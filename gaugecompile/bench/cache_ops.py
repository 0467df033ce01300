"""Time ManifoldCache edits against the re-rotating / index_select reference on DynamicCache-like tensors.

    python benchmarks/cache_ops.py [--tokens 16384] [--layers 2] [--kv-heads 8] [--head-dim 64] [--beams 4]

The reference holds K/V as [batch, kv_heads, tokens, head_dim] per layer (DynamicCache's layout)
and does what a cache without block deltas must do: cut/concatenate the tensors and re-rotate every
key whose position changed (delete, splice), or index_select the batch (reorder).  ManifoldCache
edits its block table only, plus a copy of the one block an edit off block boundaries splits (the
"unaligned" rows: cuts and a chunk that start and end inside blocks).  Both run side by side in this
process; the table prints medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gaugecompile.cache import ManifoldCache
from gaugecompile.models.random_configs import random_config
from gaugecompile.rope import RopeSpec, delta_cos_sin, rotate


def _median_ms(fn, setup=None, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        state = setup() if setup else None
        t0 = time.perf_counter()
        fn(state)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rerotate(k: torch.Tensor, rope: RopeSpec, delta: int) -> torch.Tensor:
    """K-shift: every key rotated by the same delta (cos/sin computed once, broadcast over tokens)."""
    cos, sin = delta_cos_sin(torch.tensor(delta), rope.inv_freq, k.dtype)
    return rotate(k, cos, sin, rope.rotary_dim, rope.interleaved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args(argv)
    n, h, d = args.tokens, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    config = random_config("llama", num_hidden_layers=args.layers, num_attention_heads=h, num_key_value_heads=h,
                           hidden_size=h * d, max_position_embeddings=4 * n)
    cache = ManifoldCache(config, max_batch_size=args.beams, max_tokens=3 * n, block_size=args.block_size)
    rope = cache.rope
    keys = [torch.randn(1, h, n, d) for _ in range(args.layers)]
    vals = [torch.randn(1, h, n, d) for _ in range(args.layers)]
    with torch.no_grad():
        for layer in range(args.layers):
            cache.update(keys[layer], vals[layer], layer)
    cut, span = n // 4, n // 16

    def fresh_fork():
        cache.set_batch([0])
        (seq,) = cache.fork(0, 1)
        return seq

    rows = []
    for name, off in (("delete", 0), ("delete, unaligned", 5)):
        # delete [a, b): later keys move down by b - a
        a, b = cut + off, 2 * cut + 2 * off
        ours = _median_ms(lambda s, a=a, b=b: cache.delete(s, a, b), fresh_fork)
        _cleanup(cache)

        def ref_delete(_, a=a, b=b):
            for k, v in zip(keys, vals, strict=True):
                torch.cat([k[:, :, :a], _rerotate(k[:, :, b:], rope, a - b)], 2)
                torch.cat([v[:, :, :a], v[:, :, b:]], 2)
        rows.append((name, ours, _median_ms(ref_delete)))

    for name, off in (("splice", 0), ("splice, unaligned", 3)):
        # splice the chunk [off, off + span + off) at `at`: the chunk moves, later keys move up by its length
        at, lo, hi = cut + 2 * off, off, span + 2 * off
        chunk = cache.chunk(0, lo, hi)
        ours = _median_ms(lambda s, chunk=chunk, at=at: cache.splice(s, chunk, at), fresh_fork)
        _cleanup(cache)
        chunk.free()

        def ref_splice(_, at=at, lo=lo, hi=hi):
            for k, v in zip(keys, vals, strict=True):
                moved = _rerotate(k[:, :, lo:hi], rope, at - lo)
                torch.cat([k[:, :, :at], moved, _rerotate(k[:, :, at:], rope, hi - lo)], 2)
                torch.cat([v[:, :, :at], v[:, :, lo:hi], v[:, :, at:]], 2)
        rows.append((name, ours, _median_ms(ref_splice)))

    # reorder `beams` rows of `n` tokens
    cache.set_batch([0])
    cache.fork(0, args.beams - 1)
    idx = torch.tensor([args.beams - 1 - i for i in range(args.beams)])
    ours = _median_ms(lambda _: cache.reorder(idx))
    big_k = [k.expand(args.beams, -1, -1, -1).contiguous() for k in keys]
    big_v = [v.expand(args.beams, -1, -1, -1).contiguous() for v in vals]

    def ref_reorder(_):
        for k, v in zip(big_k, big_v, strict=True):
            k.index_select(0, idx)
            v.index_select(0, idx)
    rows.append((f"reorder ({args.beams} beams)", ours, _median_ms(ref_reorder)))

    print(f"KV cache edits at {n} tokens, {args.layers} layers, {h} KV heads x {d}, float32, "
          f"block {args.block_size} (median ms, {torch.get_num_threads()} threads)")
    print(f"{'operation':<20} {'ManifoldCache':>14} {'re-rotate/index_select':>24} {'speed-up':>9}")
    for name, a, b in rows:
        print(f"{name:<20} {a:>14.3f} {b:>24.3f} {b / a:>8.1f}x")
    return 0


def _cleanup(cache: ManifoldCache) -> None:
    for seq in [s for s in cache.sequences if s != 0]:
        cache.free(seq)


if __name__ == "__main__":
    raise SystemExit(main())
