"""CPU time of rotated_query_attention (native kernel) against its torch loop and reference_attention
(gather + re-rotate + softmax).

Decode (q_len 1), batch 1, 8 heads, head dim 128, block size 16, measured side by side in one
process for three mappings: identity (contiguous, delta 0), a shifted window (contiguous, one
non-zero delta), and a fragmented table (random blocks, random deltas).

    python benchmarks/op_cpu.py [--tokens 16384] [--repeat 10]
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import torch

import gaugecompile as gc


def _time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    heads, head_dim, block_size = 8, 128, 16
    n_blocks = args.tokens // block_size
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, head_dim, generator=g)
    k_pool = torch.randn(n_blocks, block_size, heads, head_dim, generator=g)
    v_pool = torch.randn_like(k_pool)
    lens = torch.tensor([args.tokens])
    rope = gc.RopeSpec.from_base(10000.0, head_dim)
    mappings = {
        "identity": (torch.arange(n_blocks)[None], torch.zeros(1, n_blocks, dtype=torch.long)),
        "shifted window": (torch.arange(n_blocks)[None], torch.full((1, n_blocks), -123_456)),
        "fragmented": (torch.randperm(n_blocks, generator=g)[None],
                       torch.randint(-(2**31), 2**31, (1, n_blocks), generator=g)),
    }
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# decode, batch 1, {heads} heads, head dim {head_dim}, {args.tokens} tokens, block {block_size}, float32")
    print(f"{'mapping':<16} {'op (ms)':>9} {'loop (ms)':>10} {'reference (ms)':>15} {'speed-up':>9} "
          f"{'max |diff|':>11}")
    for name, (table, delta) in mappings.items():
        op = functools.partial(gc.rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope, impl="auto")
        ref = functools.partial(gc.rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope,
                                impl="reference")
        loop = functools.partial(gc.rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope, impl="loop")
        t_op, t_loop, t_ref = _time(op, args.repeat), _time(loop, args.repeat), _time(ref, args.repeat)
        diff = float((op() - ref()).abs().max())
        print(f"{name:<16} {t_op * 1e3:9.2f} {t_loop * 1e3:10.2f} {t_ref * 1e3:15.2f} {t_ref / t_op:8.1f}x "
              f"{diff:11.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
