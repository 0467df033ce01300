"""GPU decode: the generated Triton kernels against copy bandwidth and gather-then-attend baselines.

For every dtype x table kind x batch x context cell (one decode token per sequence over a paged pool),
in one process on one GPU:

- op: `torch.ops.gauge.rotated_query_attention` (the generated kernels, split-KV chosen automatically);
- its achieved bandwidth: K and V bytes read / op time, against a device-to-device copy measured
  in the same run (copy bandwidth counts bytes read + bytes written);
- sdpa: torch SDPA over an already gathered, contiguous, re-rotated cache (the best a
  gather-then-attend system can do: the gather is not timed);
- gather: gauge::materialize_kv (gather + re-rotate every key) + SDPA, what a cache must do
  without the op;
- err: max |op - sdpa| / max |sdpa| (the op is checked before it is timed);
- with --copy-same-bytes, also a device-to-device copy of exactly the cell's K and V pools (one copy
  kernel over the same bytes), so "% of same-bytes copy" compares like with like at every size.

Table kinds (--tables): "fragmented" (the default: every sequence a random permutation of pool blocks,
a random int delta per block), "contiguous" (blocks in order, delta 0: the identity mapping) and
"one-delta" (blocks in order, one random delta per sequence: a shifted window).

Prints a table (device, versions, date) and saves JSON and Markdown under benchmarks/results/.
Needs CUDA; without it the script says so and exits with status 0.

    python benchmarks/gpu_decode.py [--batches 1 8 32] [--contexts 1024 8192 32768 131072]
        [--dtype bfloat16 float16] [--tables fragmented contiguous one-delta] [--copy-same-bytes]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
from pathlib import Path

RESULTS = Path("benchmarks") / "results"
#: Block-table kinds: how the logical blocks of each sequence map to pool blocks and which deltas they carry.
TABLE_KINDS = ("fragmented", "contiguous", "one-delta")
DTYPES = ("bfloat16", "float16", "float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bfloat16"],
                        help="one or more element types, each measured over every cell (default bfloat16)")
    parser.add_argument("--tables", nargs="+", choices=TABLE_KINDS, default=["fragmented"],
                        help="block-table kinds, each measured over every cell (default fragmented)")
    parser.add_argument("--copy-same-bytes", action="store_true",
                        help="also time a device copy of each cell's own K/V pools (same bytes as the op reads)")
    parser.add_argument("--rep-ms", type=int, default=200, help="time budget per measurement (triton do_bench)")
    parser.add_argument("--copy-mib", type=int, default=2048, help="size of the device-to-device copy")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON/Markdown results")
    parser.add_argument("--no-save", action="store_true", help="print only")
    return parser.parse_args(argv)


def _bench(fn, rep_ms: int) -> float:
    """Median milliseconds of fn (triton's do_bench: warm-up, L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(10, rep_ms // 8), rep=rep_ms, return_mode="median"))


def copy_bandwidth(mib: int, rep_ms: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    import torch

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), rep_ms)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def make_table(batch: int, n_blocks: int, kind: str, generator, device="cuda"):
    """(block_table [batch, n_blocks], block_delta int64) of one table kind over a pool of batch * n_blocks blocks.

    fragmented: a random permutation of the pool, a random int delta in [-2^31, 2^31) per block;
    contiguous: sequence b owns blocks [b * n_blocks, (b + 1) * n_blocks) in order, every delta 0;
    one-delta: the same blocks in order, one random delta shared by all blocks of a sequence.
    """
    import torch

    pool_blocks = batch * n_blocks
    if kind == "fragmented":
        table = torch.randperm(pool_blocks, device=device, generator=generator).view(batch, n_blocks)
        delta = torch.randint(-(2**31), 2**31, (batch, n_blocks), device=device, generator=generator,
                              dtype=torch.int64)
    elif kind == "contiguous":
        table = torch.arange(pool_blocks, device=device).view(batch, n_blocks)
        delta = torch.zeros(batch, n_blocks, device=device, dtype=torch.int64)
    elif kind == "one-delta":
        table = torch.arange(pool_blocks, device=device).view(batch, n_blocks)
        delta = torch.randint(-(2**31), 2**31, (batch, 1), device=device, generator=generator, dtype=torch.int64)
        delta = delta.expand(batch, n_blocks).contiguous()
    else:
        raise ValueError(f"kind: expected one of {TABLE_KINDS}, got {kind!r}")
    return table, delta


def make_inputs(batch: int, context: int, args: argparse.Namespace, seed: int = 0, *, dtype: str | None = None,
                table: str = "fragmented"):
    """A decode step over a paged pool: (q, k_pool, v_pool, table, delta, lens, rope, kv).

    K and V are the two halves of one buffer `kv` [2, blocks, block_size, kv_heads, head_dim], so a copy
    of exactly the bytes the op reads is one kernel. `table` is one of TABLE_KINDS.
    """
    import torch

    from gaugecompile.block_tables import full_block_lens
    from gaugecompile.rope import RopeSpec

    dtype = getattr(torch, dtype or args.dtype[0])
    g = torch.Generator(device="cuda").manual_seed(seed)
    bs = args.block_size
    n_blocks = -(-context // bs)
    pool_blocks = batch * n_blocks
    kv = torch.randn(2, pool_blocks, bs, args.kv_heads, args.head_dim, device="cuda", dtype=dtype, generator=g)
    k_pool, v_pool = kv[0], kv[1]
    q = torch.randn(batch, args.heads, 1, args.head_dim, device="cuda", dtype=dtype, generator=g)
    block_table, delta = make_table(batch, n_blocks, table, g)
    lens = full_block_lens(torch.full((batch,), context, device="cuda", dtype=torch.int64), n_blocks, bs)
    rope = RopeSpec.from_base(500000.0, args.head_dim)
    return q, k_pool, v_pool, block_table, delta, lens, rope, kv


def _sdpa_over_gathered(q, gather, scale: float, out, rep_ms: int) -> dict:
    """Error of the op against SDPA over the gathered cache, and that SDPA's time (gather not timed)."""
    import torch.nn.functional as F

    k, v = gather()
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    ms = _bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True), rep_ms)
    return dict(max_rel_err=err, sdpa_gathered_ms=ms)


def measure_cell(batch: int, context: int, args: argparse.Namespace, copy_gbps: float, *,
                 dtype: str | None = None, table_kind: str = "fragmented") -> dict:
    """One row: the op, its bandwidth against the copies, and the SDPA baselines, for one cell."""
    import torch
    import torch.nn.functional as F

    from gaugecompile.codegen.launcher import choose_splits
    from gaugecompile.ops import materialize_kv

    dtype = dtype or args.dtype[0]
    q, k_pool, v_pool, table, delta, lens, rope, kv = make_inputs(batch, context, args, dtype=dtype,
                                                                   table=table_kind)
    scale = args.head_dim**-0.5
    inv_freq = rope.inv_freq.cuda()
    op_args = (q, k_pool, v_pool, table, delta, lens, inv_freq, rope.rotary_dim, rope.interleaved, scale, True)
    op = lambda: torch.ops.gauge.rotated_query_attention(*op_args)
    gather = lambda: materialize_kv(k_pool, v_pool, table, delta, rope, context, lens)
    gather_attend = lambda: F.scaled_dot_product_attention(q, *gather(), scale=scale, enable_gqa=True)

    row = dict(dtype=dtype, table=table_kind, batch=batch, context=context,
               kv_bytes=2 * batch * context * args.kv_heads * args.head_dim * k_pool.element_size(),
               splits=choose_splits(batch * args.kv_heads, table.shape[1], args.block_size, q.device),
               max_rel_err=None, sdpa_gathered_ms=None, gather_rerotate_sdpa_ms=None, speedup_vs_gather=None,
               copy_same_bytes_ms=None, copy_same_bytes_GBps=None, pct_of_same_bytes_copy=None)
    out = op()[0]
    try:
        row.update(_sdpa_over_gathered(q, gather, scale, out, args.rep_ms))
        torch.cuda.empty_cache()
        row["gather_rerotate_sdpa_ms"] = _bench(gather_attend, args.rep_ms)
    except torch.cuda.OutOfMemoryError:
        pass  # the gathered copy does not fit next to the pool: recorded as missing
    torch.cuda.empty_cache()
    row["op_ms"] = _bench(op, args.rep_ms)
    row["op_GBps"] = row["kv_bytes"] / (row["op_ms"] * 1e-3) / 1e9
    row["pct_of_copy"] = 100.0 * row["op_GBps"] / copy_gbps
    if row["gather_rerotate_sdpa_ms"] is not None:
        row["speedup_vs_gather"] = row["gather_rerotate_sdpa_ms"] / row["op_ms"]
    if getattr(args, "copy_same_bytes", False):
        try:
            dst = torch.empty_like(kv)
            row["copy_same_bytes_ms"] = _bench(lambda: dst.copy_(kv), args.rep_ms)
            del dst
            row["copy_same_bytes_GBps"] = 2 * kv.numel() * kv.element_size() / (row["copy_same_bytes_ms"] * 1e-3) / 1e9
            row["pct_of_same_bytes_copy"] = 100.0 * row["op_GBps"] / row["copy_same_bytes_GBps"]
        except torch.cuda.OutOfMemoryError:
            pass  # no room for a second copy of the pools: recorded as missing
        torch.cuda.empty_cache()
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_lines(header: dict, rows: list[dict]) -> list[str]:
    """The Markdown table of `rows` under a two-line header, and the goal counts (80% of copy at >= 8k)."""
    lines = [
        f"# gpu_decode: {header['device']} | torch {header['torch']} | triton {header['triton']} | {header['date']}",
        f"# decode, {header['heads']} heads / {header['kv_heads']} KV heads, head dim {header['head_dim']}, "
        f"block {header['block_size']}, {header['dtype']}; copy bandwidth {header['copy_GBps']:.0f} GB/s "
        "(read + write)",
        "",
        "| dtype | table | batch | context | splits | op ms | op GB/s | % of copy | % of same-bytes copy "
        "| sdpa (gathered) ms | gather+re-rotate+sdpa ms | speed-up | max rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('dtype', header['dtype'])} | {r.get('table', 'fragmented')} | {r['batch']} | {r['context']} | "
            f"{r['splits']} | {r['op_ms']:.4f} | {r['op_GBps']:.0f} | {r['pct_of_copy']:.0f} | "
            f"{_fmt(r.get('pct_of_same_bytes_copy'), '.0f')} | {_fmt(r.get('sdpa_gathered_ms'), '.4f')} | "
            f"{_fmt(r.get('gather_rerotate_sdpa_ms'), '.3f')} | {_fmt(r.get('speedup_vs_gather'), '.1f')} | "
            f"{_fmt(r.get('max_rel_err'), '.1e')} |"
        )
    long_rows = [r for r in rows if r["context"] >= 8192]
    at_80 = sum(r["pct_of_copy"] >= 80 for r in long_rows)
    compared = [r for r in rows if r.get("speedup_vs_gather") is not None]
    faster = sum(r["speedup_vs_gather"] > 1 for r in compared)
    lines += ["", f"# context >= 8k at >= 80% of copy bandwidth: {at_80}/{len(long_rows)}; "
              f"faster than gather + re-rotate + SDPA: {faster}/{len(compared)}"]
    same = [r for r in long_rows if r.get("pct_of_same_bytes_copy") is not None]
    if same:
        lines.append(f"# context >= 8k at >= 80% of a copy of the same bytes: "
                     f"{sum(r['pct_of_same_bytes_copy'] >= 80 for r in same)}/{len(same)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_decode: TRITON_INTERPRET is set; unset it to measure the compiled kernels.", file=sys.stderr)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_decode: CUDA is not available on this machine; nothing measured.", file=sys.stderr)
        return 0
    import triton

    props = torch.cuda.get_device_properties(0)
    copy_gbps = copy_bandwidth(args.copy_mib, args.rep_ms)
    header = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                  date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), heads=args.heads,
                  kv_heads=args.kv_heads, head_dim=args.head_dim, block_size=args.block_size,
                  dtype=", ".join(args.dtype), dtypes=list(args.dtype), tables=list(args.tables),
                  copy_same_bytes=bool(args.copy_same_bytes), copy_GBps=copy_gbps)
    rows = []
    for dtype in args.dtype:
        for table_kind in args.tables:
            for batch in args.batches:
                for context in args.contexts:
                    rows.append(measure_cell(batch, context, args, copy_gbps, dtype=dtype, table_kind=table_kind))
                    print(f"  {dtype} {table_kind:>10} batch {batch:>3} context {context:>7}: "
                          f"op {rows[-1]['op_ms']:.4f} ms ({rows[-1]['pct_of_copy']:.0f}% of copy)", flush=True)
    lines = table_lines(header, rows)
    print("\n".join(lines))
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "gpu_decode_{}_{}".format(re.sub(r"[^A-Za-z0-9]+", "-", props.name).strip("-"),
                                         dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))
        (args.out / f"{stem}.json").write_text(json.dumps(dict(header=header, rows=rows), indent=2))
        (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print(f"saved {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
