"""Bytes each reorganisation sends between tensor-parallel ranks, against the KV bytes a re-rotating cache rewrites.

    python benchmarks/tp_bytes.py [--ranks 2] [--tokens 16384] [--layers 32] [--kv-heads 8] [--head-dim 128]

Relaunches itself on `--ranks` local gloo ranks.  Each rank holds a ManifoldCache whose pools keep its share
of the KV heads of a Llama-3-8B-shaped model (float16), filled with `--tokens` tokens of one sequence through
`update()` (the cache's own forward path, with random keys: what is measured does not depend on them).  Then
the reorganisations a server makes run on every rank, each counted by wrapping the collectives
(`ByteCounter`): the edits' records broadcast from rank 0, a decode step's bookkeeping (nothing: its inputs
are identical on every rank), `check_sync`.  The comparison column is what a cache without block offsets
(DynamicCache plus re-rotation, as `cache_ops.py` times it) rewrites on each rank for the same edit: the
tokens it moves or re-rotates times the KV bytes per token per rank.  No timing: bytes are exact counts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from ..cache import ManifoldCache
from ..models.random_configs import random_config
from .distributed import ByteCounter, relaunch, under_torchrun


def _fill(cache: ManifoldCache, rows: int, q: int, heads: int, dim: int, layers: int) -> None:
    """One forward of `q` new tokens per row through update(), as a model's layers would run it."""
    gen = torch.Generator().manual_seed(q)
    for layer in range(layers):
        k = torch.randn(rows, heads, q, dim, generator=gen).half()
        cache.update(k, k.clone(), layer)


def _rows(args: argparse.Namespace) -> tuple[list[tuple[str, int, int]], int, int]:
    """(edit, bytes sent by this rank, KV bytes a re-rotating cache rewrites per rank) for each edit."""
    import torch.distributed as dist

    n, layers, dim = args.tokens, args.layers, args.head_dim
    world = dist.get_world_size()
    heads = args.kv_heads // world
    config = random_config("llama", num_hidden_layers=layers, num_attention_heads=4 * args.kv_heads,
                           num_key_value_heads=args.kv_heads, hidden_size=4 * args.kv_heads * dim,
                           max_position_embeddings=4 * n)
    cache = ManifoldCache(config, max_batch_size=4, max_tokens=n + 2048, block_size=16, kv_dtype=torch.float16,
                          group=dist.group.WORLD)
    per_token = layers * 2 * heads * dim * 2  # K and V, float16, this rank's heads
    cache.new_sequences(1)
    _fill(cache, 1, n, heads, dim, layers)
    rows = []

    def measure(name: str, edit, moved_tokens: int) -> None:
        with ByteCounter() as counter:
            edit()
        rows.append((name, counter.bytes, moved_tokens * per_token))

    mid = n // 2
    measure("delete 16 tokens (one block) at n/2", lambda: cache.delete(0, mid, mid + 16), n - mid - 16)
    length = cache.seq_len(0)
    measure("delete 7 tokens inside a block", lambda: cache.delete(0, mid + 3, mid + 10), length - mid - 10)
    chunk = None

    def take() -> None:
        nonlocal chunk
        chunk = cache.chunk(0, 0, 512)

    measure("chunk of 512 tokens (a handle)", take, 0)  # the reference keeps a view
    length = cache.seq_len(0)
    measure("splice the 512-token chunk at n/2", lambda: cache.splice(0, chunk, mid), length - mid + 512)
    measure("free the chunk", chunk.free, 0)
    length = cache.seq_len(0)
    measure("fork into 4 beams", lambda: cache.fork(0, 3), 3 * length)
    measure("reorder 4 beams", lambda: cache.reorder([1, 1, 0, 2]), 4 * length)
    measure("decode step bookkeeping, 4 rows", lambda: _fill(cache, 4, 1, heads, dim, layers), 0)
    measure("free 3 beams", lambda: [cache.free(s) for s in cache.batch[1:]], 0)
    length = cache.seq_len(0)
    measure("set_window(4, 4096)", lambda: cache.set_window(4, 4096), 4096 if length > 4 + 4096 else 0)
    measure("check_sync (digest all-reduce)", cache.check_sync, 0)
    return rows, heads, per_token


def _print(args: argparse.Namespace, rows: list[tuple[str, int, int]], heads: int, per_token: int) -> None:
    import torch.distributed as dist
    import transformers

    print(f"\nTensor parallel over {dist.get_world_size()} ranks ({dist.get_backend()}): bytes per reorganisation; "
          f"{args.tokens} tokens, {args.layers} layers, {args.kv_heads} KV heads ({heads} per rank) x "
          f"{args.head_dim}, float16 ({per_token} KV bytes per token per rank)")
    print(f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print(f"| {'edit':<38} | {'bytes sent (rank 0)':>19} | {'KV bytes rewritten per rank, re-rotating':>40} | "
          f"{'ratio':>9} |")
    print(f"|{'-' * 40}|{'-' * 21}|{'-' * 42}|{'-' * 11}|")
    for name, sent, rewritten in rows:
        ratio = f"{rewritten / sent:.2e}" if sent and rewritten else "-"
        print(f"| {name:<38} | {sent:>19,} | {rewritten:>40,} | {ratio:>9} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    if not under_torchrun():
        return relaunch(args.ranks, argv if argv is not None else sys.argv[1:])
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if args.kv_heads % dist.get_world_size():
        raise SystemExit(f"--kv-heads: {args.kv_heads} heads do not split over {dist.get_world_size()} ranks")
    rows, heads, per_token = _rows(args)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, rows)
    if dist.get_rank() == 0:
        if any([r[:2] for r in other] != [r[:2] for r in rows] for other in every):
            raise SystemExit("ranks sent different byte counts")
        _print(args, rows, heads, per_token)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
