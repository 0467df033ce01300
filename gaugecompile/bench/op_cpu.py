"""CPU time of rotated_query_attention (native kernel) against its torch loop and reference_attention
(gather + re-rotate + softmax).

Decode (q_len 1), batch 1, 8 heads, head dim 128, block size 16, measured side by side in one
process for three mappings: identity (contiguous, delta 0), a shifted window (contiguous, one
non-zero delta), and a fragmented table (random blocks, random deltas).

    python benchmarks/op_cpu.py [--tokens 16384] [--repeat 10] [--window 4096]

With `--window W`, a second table: a sliding-window layer's decode step over the same view, the op with
`window=W` (it reads only the blocks of the last W tokens) against the same op over the whole view, against what
an unrewritten site computes (`materialize_kv` of the view, the last W tokens sliced, SDPA) and against SDPA
over a contiguous cache holding just the last W tokens (what transformers' sliding-window cache keeps).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import torch

from gaugecompile.ops import materialize_kv, rotated_query_attention
from gaugecompile.rope import RopeSpec


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
    parser.add_argument("--window", type=int, default=0, help="also time a sliding window of this many tokens")
    args = parser.parse_args(argv)
    heads, head_dim, block_size = 8, 128, 16
    n_blocks = args.tokens // block_size
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, head_dim, generator=g)
    k_pool = torch.randn(n_blocks, block_size, heads, head_dim, generator=g)
    v_pool = torch.randn_like(k_pool)
    lens = torch.tensor([args.tokens])
    rope = RopeSpec.from_base(10000.0, head_dim)
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
        op = functools.partial(rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope, impl="auto")
        ref = functools.partial(rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope,
                                impl="reference")
        loop = functools.partial(rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope, impl="loop")
        t_op, t_loop, t_ref = _time(op, args.repeat), _time(loop, args.repeat), _time(ref, args.repeat)
        diff = float((op() - ref()).abs().max())
        print(f"{name:<16} {t_op * 1e3:9.2f} {t_loop * 1e3:10.2f} {t_ref * 1e3:15.2f} {t_ref / t_op:8.1f}x "
              f"{diff:11.2e}")
    if args.window:
        _window_rows(q, k_pool, v_pool, lens, rope, mappings, args.window, args.repeat)
    return 0


def _window_rows(q, k_pool, v_pool, lens, rope, mappings, window: int, repeat: int) -> None:
    """The sliding-window table (see the module docstring)."""
    tokens = int(lens[0])  # the pools have as many KV heads as q has heads: SDPA needs no repeat
    print(f"# sliding window of {window} tokens over the {tokens}-token view")
    print(f"{'mapping':<16} {'op window (ms)':>15} {'op whole (ms)':>14} {'gather+slice+sdpa (ms)':>23} "
          f"{'sdpa last W (ms)':>17} {'max |diff|':>11}")
    k_last = k_pool.flatten(0, 1)[tokens - window:tokens].permute(1, 0, 2)[None].contiguous()
    v_last = v_pool.flatten(0, 1)[tokens - window:tokens].permute(1, 0, 2)[None].contiguous()
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k_last, v_last)
    for name, (table, delta) in mappings.items():
        windowed = functools.partial(rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope,
                                     window=window)
        whole = functools.partial(rotated_query_attention, q, k_pool, v_pool, table, delta, lens, rope)

        def unrewritten(table=table, delta=delta):
            k, v = materialize_kv(k_pool, v_pool, table, delta, rope, tokens)
            return torch.nn.functional.scaled_dot_product_attention(q, k[:, :, -window:], v[:, :, -window:])

        times = [_time(fn, repeat) for fn in (windowed, whole, unrewritten, sdpa)]
        diff = float((windowed() - unrewritten()).abs().max())
        print(f"{name:<16} {times[0] * 1e3:15.2f} {times[1] * 1e3:14.2f} {times[2] * 1e3:23.2f} "
              f"{times[3] * 1e3:17.2f} {diff:11.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
