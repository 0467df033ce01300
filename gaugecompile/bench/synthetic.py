"""The benchmark suite's scenarios on synthetic tensors (no model): scenario 1, reorganisation cost, and scenario 6,
decode attention against this machine's read floor.

Both run on random pools of fixed shapes, so their figures depend on the cache and the op alone, not on a
checkpoint: table edits (delete, splice, set_window, reorder) against re-rotating keys and index_select on a
DynamicCache, and the op against the torch loop, SDPA over a contiguous cache and a reduction over the same bytes.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig

from gaugecompile.bench.baselines import RerotatingSinkCache
from gaugecompile.bench.measure import log, ratio, timed
from gaugecompile.cache import ManifoldCache, rope_from_config
from gaugecompile.ops import rotated_query_attention
from gaugecompile.rope import RopeSpec, delta_cos_sin, rotate

__all__ = ["scenario_reorg", "scenario_decode"]


# ----------------------------------------------------------------------------- 1. reorganisation cost


def synthetic_config(layers: int = 4, kv_heads: int = 8, head_dim: int = 128) -> LlamaConfig:
    """A Llama config of the scenario's cache shapes (no model is built from it: only its layers and RoPE count)."""
    return LlamaConfig(num_hidden_layers=layers, num_attention_heads=kv_heads, num_key_value_heads=kv_heads,
                       hidden_size=kv_heads * head_dim, intermediate_size=64, vocab_size=128, rope_theta=1e4)


def filled_caches(config: LlamaConfig, length: int, batch: int = 1) -> tuple[ManifoldCache, DynamicCache]:
    """A ManifoldCache and a DynamicCache holding the same `length` random tokens per layer."""
    gen = torch.Generator().manual_seed(length)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    manifold = ManifoldCache(config, max_batch_size=batch, max_tokens=length + 256 * batch)  # forks share blocks
    dynamic = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        k, v = (torch.randn(1, heads, length, dim, generator=gen) for _ in range(2))
        manifold.update(k, v, layer)
        dynamic.update(k, v, layer)
    if batch > 1:
        manifold.fork(manifold.batch[0], batch - 1)
        dynamic.batch_repeat_interleave(batch)
    return manifold, dynamic


def rerotate_(layer, start: int, shift: int, rope) -> None:
    """Re-rotate the keys of `layer` from `start` on by `shift` positions (the O(L*d) way to move tokens)."""
    cos, sin = delta_cos_sin(torch.tensor(shift), rope.inv_freq, layer.keys.dtype)
    tail = rotate(layer.keys[:, :, start:], cos, sin, rope.rotary_dim, rope.interleaved)
    layer.keys = torch.cat([layer.keys[:, :, :start], tail], dim=-2)


REORDER_MAX_TOKENS = 16384


def reorg_at(config: LlamaConfig, rope, length: int) -> list[dict]:
    """The four operations at one context length, gauge and baseline."""
    rows = []
    manifold, dynamic = filled_caches(config, length)
    seq = manifold.batch[0]
    chunk_tokens = 64
    chunk = manifold.chunk(seq, 0, chunk_tokens)
    deleted = manifold.chunk(seq, 16, 32)  # what `delete` removes; splicing it back restores the sequence
    originals = [(layer.keys, layer.values) for layer in dynamic.layers]

    def restore_dynamic():  # free: restores references
        for layer, (k, v) in zip(dynamic.layers, originals, strict=True):
            layer.keys, layer.values = k, v

    def base_delete():
        for layer in dynamic.layers:
            layer.keys = torch.cat([layer.keys[:, :, :16], layer.keys[:, :, 32:]], dim=-2)
            layer.values = torch.cat([layer.values[:, :, :16], layer.values[:, :, 32:]], dim=-2)
            rerotate_(layer, 16, -16, rope)

    def base_splice():
        for layer in dynamic.layers:
            piece = rotate(layer.keys[:, :, :chunk_tokens], *delta_cos_sin(torch.tensor(1024), rope.inv_freq),
                           rope.rotary_dim, rope.interleaved)
            layer.keys = torch.cat([layer.keys[:, :, :1024], piece, layer.keys[:, :, 1024:]], dim=-2)
            layer.values = torch.cat([layer.values[:, :, :1024], layer.values[:, :, :chunk_tokens],
                                      layer.values[:, :, 1024:]], dim=-2)
            rerotate_(layer, 1024 + chunk_tokens, chunk_tokens, rope)

    sink_layers = RerotatingSinkCache(rope, config.num_hidden_layers, num_sink_tokens=16,
                                      window_length=length)
    for layer, source in zip(sink_layers.layers, dynamic.layers, strict=True):
        layer.lazy_initialization(source.keys, source.values)
        layer.keys, layer.values = source.keys, source.values
    sink_originals = [(layer.keys, layer.values) for layer in sink_layers.layers]

    def base_window():  # evict one block and re-rotate the window, as a sink cache does
        for layer in sink_layers.layers:
            layer.shift(16)

    def restore_sink():
        for layer, (k, v) in zip(sink_layers.layers, sink_originals, strict=True):
            layer.keys, layer.values = k, v

    def gauge_window():  # one set_window step: evicts the oldest non-sink block (a table edit)
        manifold.set_window(16, length - 32)

    tail = manifold.chunk(seq, 0, 16)

    def undo_window():  # policy off, grow back by one block
        manifold.set_window(16, None)
        manifold.splice(seq, tail, manifold.seq_len(seq))

    ops = {"delete": (lambda: manifold.delete(seq, 16, 32), lambda: manifold.splice(seq, deleted, 16),
                      base_delete, restore_dynamic),
           "splice": (lambda: manifold.splice(seq, chunk, 1024),
                      lambda: manifold.delete(seq, 1024, 1024 + chunk_tokens), base_splice, restore_dynamic),
           "set_window": (gauge_window, undo_window, base_window, restore_sink)}
    if length <= REORDER_MAX_TOKENS:  # 4 rows of DynamicCache + their reordered copy: 16 GB at 64k tokens
        manifold4, dynamic4 = filled_caches(config, length, batch=4)
        beam_idx = torch.tensor([1, 0, 3, 2])
        ops["reorder"] = (lambda: manifold4.reorder(beam_idx), None, lambda: dynamic4.reorder_cache(beam_idx), None)
    for name, (gauge_fn, gauge_undo, base_fn, base_undo) in ops.items():
        g, b = timed(gauge_fn, undo=gauge_undo), timed(base_fn, undo=base_undo)
        if manifold.seq_len(seq) != length:
            raise RuntimeError(f"reorg {name}: the undo did not restore the sequence length")
        rows.append(dict(op=name, tokens=length, gauge_s=g, baseline_s=b, ratio=ratio(b, g)))
    return rows


def scenario_reorg(quick: bool) -> dict:
    """delete / splice / set_window step / reorder: table edits against re-rotation and index_select."""
    config = synthetic_config()
    rope = rope_from_config(config)
    lengths = [256, 1024] if quick else [1024, 4096, 16384, 65536]
    rows = []
    for length in lengths:
        log(f"reorg: {length} tokens")
        rows += reorg_at(config, rope, length)
    return dict(title="reorganisation cost (4 layers, 8 KV heads, head dim 128)",
                baseline="re-rotate keys / index_select on DynamicCache", rows=rows)


# ----------------------------------------------------------------------------- 6. decode attention


def decode_tables(blocks: int, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The three mappings of the decode goal: contiguous (delta 0), one delta, fragmented (random blocks and deltas)."""
    ordered = torch.arange(blocks).unsqueeze(0)
    return {
        "contiguous": (ordered, torch.zeros_like(ordered)),
        "one delta": (ordered, torch.full_like(ordered, -123_457)),
        "fragmented": (torch.randperm(blocks, generator=gen).unsqueeze(0),
                       torch.randint(-(2**31), 2**31, (1, blocks), generator=gen)),
    }


def read_floor(pools: list[torch.Tensor], repeat: int = 7) -> float:
    """Best seconds of one reduction over every byte of `pools`: what reading K and V once costs here, now."""
    return min(timed(lambda: [p.sum() for p in pools], 1) for _ in range(repeat))


def decode_rows(heads: int, kv_heads: int, dim: int, layers: int, length: int, gen: torch.Generator) -> list[dict]:
    """One shape: the op on each table kind, the torch loop, SDPA over a contiguous cache, and the read floor."""
    block = 16
    blocks = length // block
    rope = RopeSpec.from_base(1e4, dim)
    pools = [[torch.randn(blocks, block, kv_heads, dim, generator=gen) for _ in range(2)] for _ in range(layers)]
    q = torch.randn(1, heads, 1, dim, generator=gen)
    seq = torch.full((1, blocks), block)  # tokens per table entry, as ManifoldCache hands them to the op
    kv_bytes = sum(p.nbytes for pair in pools for p in pair)
    floor = read_floor([p for pair in pools for p in pair])
    contiguous = [[p.reshape(1, length, kv_heads, dim).transpose(1, 2) for p in pair] for pair in pools]
    sdpa_s = timed(lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                            for k, v in contiguous], 5)
    rows = []
    for kind, (table, delta) in decode_tables(blocks, gen).items():
        def run(impl: str, table=table, delta=delta) -> None:
            for k, v in pools:
                rotated_query_attention(q, k, v, table, delta, seq, rope, impl=impl)

        g = timed(lambda run=run: run("auto"), 5)
        loop = timed(lambda run=run: run("loop"), 3)
        rows.append(dict(shape=f"{heads}/{kv_heads}x{dim}, {layers} layer(s)", table=kind, tokens=length,
                         gauge_s=g, baseline_s=floor, ratio=ratio(floor, g), times_floor=g / floor,
                         torch_loop_s=loop, loop_over_gauge=loop / g, sdpa_contiguous_s=sdpa_s,
                         kv_bytes=kv_bytes, gauge_GBps=kv_bytes / g / 1e9, floor_GBps=kv_bytes / floor / 1e9))
    return rows


def scenario_decode(quick: bool) -> dict:
    """Decode attention alone against this machine's read floor (a reduction over the same pools, same run).

    Beside the op (native kernel): the torch loop it replaces, and plain SDPA over an already contiguous,
    re-rotated cache (what a gather-then-attend system does after paying the gather, which is not timed).
    SmolLM2's shapes (9/3 heads, head dim 64) run one forward's 30 layers, each over its own pools.
    """
    gen = torch.Generator().manual_seed(6)
    shapes = [(32, 8, 128, 1, n) for n in ([256, 1024] if quick else [16384, 65536])]
    shapes.append((9, 3, 64, 2 if quick else 30, 512 if quick else 4096))
    rows = []
    for heads, kv_heads, dim, layers, length in shapes:
        log(f"decode attention: {heads}/{kv_heads} heads, d {dim}, {layers} layer(s), {length} tokens")
        rows += decode_rows(heads, kv_heads, dim, layers, length, gen)
    return dict(title="decode attention against the read floor (a reduction over the same pools, this run)",
                baseline="K+V bytes read once (sum over the pools)", rows=rows)

