"""gaugecompile benchmark suite: every scenario is gauge against the real alternative, in the same process.

    gaugecompile bench [--quick] [--out DIR] [--model PATH | --random ARCH] [--only N ...]

Writes DIR/results.json (every figure, machine, versions, date), prints a table and draws PNG plots of
cost against context length. `--quick` runs CI-sized versions (a random Llama unless --model is given).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, StaticCache

import gaugecompile
from gaugecompile.bench import llama_cpp
from gaugecompile.bench.baselines import RerotatingSinkCache, append_rerotated, rope_of_model
from gaugecompile.cache import ManifoldCache, rope_from_config
from gaugecompile.cli.demo import (
    forward_replaced,
    gauge_forward,
    greedy,
    manifold_cache,
    median_step,
    prefilled,
    stream_baseline,
    stream_gauge,
    text_ids,
)
from gaugecompile.models import add_model_arguments, model_from_args
from gaugecompile.models.smollm import fetch_gguf
from gaugecompile.rope import delta_cos_sin, rotate


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object], repeat: int = 5, undo: Callable[[], object] | None = None) -> float:
    """Median seconds of `fn()` over `repeat` runs (after one warm-up); `undo()` restores the state after each
    run, outside the timed region."""
    samples = []
    for index in range(repeat + 1):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if undo is not None:
            undo()
        if index:
            samples.append(elapsed)
    return statistics.median(samples)


def ratio(base: float, gauge: float) -> float:
    return base / gauge if gauge > 0 else float("inf")


# ----------------------------------------------------------------------------- 1. reorganisation cost


def synthetic_config(layers: int = 4, kv_heads: int = 8, head_dim: int = 128) -> LlamaConfig:
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


# ----------------------------------------------------------------------------- real-model scenarios

_SHARED: dict = {}


def shared_cache(model) -> ManifoldCache:
    """One ManifoldCache for every real-model scenario (emptied before each use): the compiled decode graphs
    see the same pools, so they are compiled once per batch size and reused."""
    if id(model) not in _SHARED:
        _SHARED[id(model)] = manifold_cache(model, batch=8, max_tokens=SHARED_TOKENS)
    cache = _SHARED[id(model)]
    cache.reset()
    cache.set_window(0, None)
    return cache


def inductor_forward(model, cache_kind: str = "dynamic"):
    """`model.forward` compiled with Inductor, once per model and cache kind (each kind its own graphs)."""
    compiled = model.__dict__.setdefault(f"_inductor_compiled_{cache_kind}", [])
    if not compiled:
        compiled.append(torch.compile(model.forward))
    return compiled[0]


def bookkeeping_per_step(cache: ManifoldCache, rows: int, repeat: int = 20) -> float:
    """Median seconds of a decode step's host bookkeeping (placing one token per row, building the tables)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        cache._begin_forward(rows, 1)
        times.append(time.perf_counter() - start)
        cache._settle()  # roll the placed token back: every repeat plans the same step
    return statistics.median(times)


def scenario_chat(model, quick: bool) -> dict:
    """Greedy chat decoding after a long prompt, per step: gauge against transformers' own caches, DynamicCache
    eager and StaticCache compiled with Inductor (the strongest plain-transformers set-up). Every prompt is
    prefilled eagerly, each variant runs a warm-up (compiling) before its timed run; tokens are compared. Also the
    host bookkeeping of a decode step over that prompt, for 1 row and for 4 beams."""
    prompt_len, steps, warm = (64 if quick else 4096), (4 if quick else 16), 3
    ids = text_ids(TOKENIZER, model.config.vocab_size, prompt_len)
    eager = model.__class__.forward.__get__(model)
    static_len = prompt_len + warm + steps + 8
    variants = {
        "gauge": (lambda: shared_cache(model), gauge_forward(model)),
        "DynamicCache eager": (lambda: DynamicCache(config=model.config), eager),
        "StaticCache + Inductor": (lambda: StaticCache(config=model.config, max_cache_len=static_len),
                                   inductor_forward(model, "static")),
    }
    results = {}
    for name, (make, forward) in variants.items():
        log(f"chat: {name} ({prompt_len}-token prompt, warm-up of {warm} steps, then {steps} timed steps)")
        with torch.no_grad():
            greedy(forward, ids, make(), warm, prefill=eager)
            tokens, times = greedy(forward, ids, make(), steps, prefill=eager)
        results[name] = (median_step(times), tokens)
    cache = shared_cache(model)  # the gauge cache holds the prompt now: time the bookkeeping of a step over it
    with torch.no_grad():
        greedy(eager, ids, cache, 1)
    book = {1: bookkeeping_per_step(cache, 1)}
    cache.fork(cache.batch[0], 3)
    with torch.no_grad():  # the first step after a fork copies each beam's shared last block; time the steps after
        model(input_ids=ids[:, -1:].repeat(4, 1), past_key_values=cache, use_cache=True)
    book[4] = bookkeeping_per_step(cache, 4)
    cache.reset()
    gauge_s, gauge_tokens = results.pop("gauge")
    rows = [dict(measure="decode step", baseline=name, tokens=prompt_len, gauge_s=gauge_s, baseline_s=s,
                 ratio=ratio(s, gauge_s), tokens_equal=tok == gauge_tokens) for name, (s, tok) in results.items()]
    rows += [dict(measure=f"host bookkeeping per step, {n} row(s)", baseline="goal 0.2 ms", tokens=prompt_len,
                  gauge_s=t, baseline_s=2e-4, ratio=ratio(2e-4, t), tokens_equal=None) for n, t in book.items()]
    return dict(title=f"chat decoding after a {prompt_len}-token prompt, per step ({steps} steps after a {warm}-step "
                      "warm-up)", baseline="DynamicCache eager / StaticCache + Inductor", rows=rows)



def scenario_beam(model, quick: bool) -> dict:
    """4 beams over a long prompt, per decode step including the reorder. Each cache is prefilled once eagerly
    (ManifoldCache: one sequence whose blocks all beams share); every timed run starts from a copy of that
    prefill and follows a warm-up run, so compilation is never timed, and the compiled models are reused."""
    beams, prompt_len, steps, warm = 4, (64 if quick else 4096), (4 if quick else 16), 3
    ids = text_ids(TOKENIZER, model.config.vocab_size, prompt_len)

    def kwargs(new_tokens: int) -> dict:
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, early_stopping=False, pad_token_id=0)

    log(f"beam: prefill the {prompt_len}-token prompt once per cache kind (eager)")
    manifold = shared_cache(model)
    prompt = manifold.prefill(model, ids[:, :-1])  # a chunk at positions 0..n-1
    dynamic_base = prefilled(model, DynamicCache(config=model.config), ids[:, :-1])

    def manifold_rows():  # one sequence holding the prompt's blocks (a table edit), shared by every beam
        manifold.reset()
        (seq,) = manifold.new_sequences(1)
        manifold.splice(seq, prompt, 0)
        manifold.fork(seq, beams - 1)
        return manifold

    def dynamic_rows():
        cache = copy.deepcopy(dynamic_base)
        cache.batch_repeat_interleave(beams)
        return cache

    variants = {"gauge": (manifold_rows, manifold.reset, gauge_forward(model)),
                "eager": (dynamic_rows, None, model.__class__.forward.__get__(model)),
                "inductor": (dynamic_rows, None, inductor_forward(model, "dynamic"))}
    results = {}
    for name, (make, done, forward) in variants.items():
        log(f"beam: {name} (warm-up of {warm} steps, then {steps} timed steps)")
        with torch.no_grad(), forward_replaced(model, forward):
            model.generate(**kwargs(warm), past_key_values=make())
            if done:
                done()
            cache = make()
            start = time.perf_counter()
            out = model.generate(**kwargs(steps), past_key_values=cache)
            results[name] = ((time.perf_counter() - start) / steps, out)
            if done:
                done()
    prompt.free()
    manifold.reset()
    gauge_s, gauge_out = results.pop("gauge")
    rows = [dict(baseline=name, tokens=prompt_len, gauge_s=gauge_s, baseline_s=s, ratio=ratio(s, gauge_s),
                 tokens_equal=bool(torch.equal(out, gauge_out))) for name, (s, out) in results.items()]
    return dict(title=f"beam search, {beams} beams, {prompt_len}-token prompt, per step ({steps} steps after a "
                      f"{warm}-step warm-up)", baseline="DynamicCache eager / Inductor", rows=rows)


def scenario_streaming(model, quick: bool) -> dict:
    sink, window, steps = 4, (32 if quick else 4096), (16 if quick else 2048)  # the 4 sinks + 4k window
    ids = text_ids(TOKENIZER, model.config.vocab_size, sink + window + steps)
    log(f"streaming: {sink}+{window}, {steps} steps (gauge)")
    g_logits, g_times, lengths = stream_gauge(gauge_forward(model), model, ids, sink=sink, window=window,
                                              cache=shared_cache(model))
    log("streaming: re-rotating sink cache")
    b_logits, b_times = stream_baseline(model, ids, sink=sink, window=window, lengths=lengths)
    skip = 1 + min(16, steps // 4)  # the prefill and the first steps (the decode graph compiles there)
    g, b = statistics.median(g_times[skip:]), statistics.median(b_times[skip:])
    return dict(title=f"StreamingLLM {sink} sinks + {window} window, {steps} steps (median step after the "
                      f"first {skip - 1}), per step",
                baseline="re-rotating sink cache", rows=[dict(
                    steps=steps, gauge_s=g, baseline_s=b, ratio=ratio(b, g),
                    tokens_equal=bool(torch.equal(g_logits.argmax(-1), b_logits.argmax(-1))),
                    max_logit_diff=(g_logits - b_logits).abs().max().item())])


def scenario_document(model, quick: bool) -> dict:
    """A prompt of two cached pieces (system prefix, document prefilled standalone at 0) + a question."""
    prefix_len, doc_len, q_len = (32, 64, 8) if quick else (1024, 2048, 32)
    ids = text_ids(TOKENIZER, model.config.vocab_size, prefix_len + doc_len + q_len)
    prefix, doc, question = ids[:, :prefix_len], ids[:, prefix_len:prefix_len + doc_len], ids[:, -q_len:]
    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=2 * (prefix_len + doc_len) + 4 * q_len + 64)
    log("document: prefill the prefix (kept as a sequence) and the document (a chunk at position 0) once")
    doc_chunk = cache.prefill(model, doc)
    prefilled(model, cache, prefix)
    prefix_seq = cache.batch[0]

    @torch.no_grad()
    def gauge_ttft():
        (row,) = cache.fork(prefix_seq, 1)  # shares the prefix blocks
        cache.set_batch([row])
        cache.splice(row, doc_chunk, prefix_len)
        logits = model(input_ids=question, past_key_values=cache, use_cache=True).logits[:, -1]
        cache.free(row)
        cache.set_batch([prefix_seq])
        return logits

    @torch.no_grad()
    def base_ttft():
        return model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits[:, -1]

    log("document: time to first token")
    g, b = timed(gauge_ttft, 3), timed(base_ttft, 3)
    rows = [dict(measure="time to first token (fork + splice + eager question forward)", gauge_s=g, baseline_s=b,
                 ratio=ratio(b, g), baseline="re-prefill whole prompt (eager)")]
    rope = rope_of_model(model)
    doc_dynamic, target = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=doc, past_key_values=doc_dynamic, use_cache=True)
        model(input_ids=prefix, past_key_values=target, use_cache=True)
    at = 1008 if not quick else prefix_len  # ~1000, block-aligned

    def gauge_place():
        cache.splice(prefix_seq, doc_chunk, at)
        cache.delete(prefix_seq, at, at + doc_len)

    def base_place():
        saved = [(layer.keys, layer.values) for layer in target.layers]
        append_rerotated(target, doc_dynamic, at, rope)
        for layer, (k, v) in zip(target.layers, saved, strict=True):
            layer.keys, layer.values = k, v

    log("document: placing the document (splice vs re-rotating its keys)")
    g, b = timed(gauge_place), timed(base_place)
    rows.append(dict(measure=f"place document at {at}", gauge_s=g, baseline_s=b, ratio=ratio(b, g),
                     baseline="re-rotate its keys"))
    return dict(title=f"document reuse: {prefix_len}-token prefix + {doc_len}-token document + {q_len}-token question",
                baseline="re-prefill / re-rotate", rows=rows)


def scenario_memory(model, quick: bool) -> dict:
    beams, prompt_len = 8, (64 if quick else 2048)
    ids = text_ids(TOKENIZER, model.config.vocab_size, prompt_len)
    log(f"memory: {beams} beams over {prompt_len} tokens")
    manifold = ManifoldCache(model.config, max_batch_size=beams, max_tokens=beams * (prompt_len + 64))
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=manifold, use_cache=True)
        model(input_ids=ids, past_key_values=dynamic, use_cache=True)
        manifold.fork(manifold.batch[0], beams - 1)
        dynamic.batch_repeat_interleave(beams)
        step = ids[:, -1:].repeat(beams, 1)
        for _ in range(4):
            model(input_ids=step, past_key_values=manifold, use_cache=True)
            model(input_ids=step, past_key_values=dynamic, use_cache=True)
    gauge_bytes = manifold.blocks_in_use * manifold.bytes_per_block
    base_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dynamic.layers)
    return dict(title=f"KV memory, {beams} beams over a {prompt_len}-token prompt (+4 steps)",
                baseline="DynamicCache", rows=[dict(gauge_bytes=gauge_bytes, baseline_bytes=base_bytes,
                                                    ratio=base_bytes / gauge_bytes)])


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
    rope = gaugecompile.RopeSpec.from_base(1e4, dim)
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
                gaugecompile.rotated_query_attention(q, k, v, table, delta, seq, rope, impl=impl)

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


def scenario_perplexity(model, quick: bool) -> dict:
    sink, window, total = 4, (32 if quick else 512), (96 if quick else 3072)
    ids = text_ids(TOKENIZER, model.config.vocab_size, total)
    prefill = sink + window - 1
    targets = ids[0, prefill:]

    def ppl(logits: torch.Tensor) -> float:  # logits[i] predicts ids[prefill + i]
        nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="mean")
        return float(torch.exp(nll))

    log(f"perplexity: {total} tokens of pydoc_data.topics, full cache")
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, prefill - 1:]
    log("perplexity: sinks + window, ManifoldCache + gauge")
    gauge_logits, _, lengths = stream_gauge(gauge_forward(model), model, ids, sink=sink, window=window,
                                            cache=shared_cache(model))
    log("perplexity: sinks + window, re-rotating sink cache")
    base_logits, _ = stream_baseline(model, ids, sink=sink, window=window, lengths=lengths)
    log("perplexity: window without sinks")
    nosink_logits, _ = stream_baseline(model, ids, sink=0, window=window + sink)
    rows = [dict(method=name, perplexity=ppl(lg)) for name, lg in (
        ("full cache", full), (f"{sink} sinks + {window} window (ManifoldCache, gauge)", gauge_logits),
        (f"{sink} sinks + {window} window (re-rotating sink cache)", base_logits),
        (f"{window + sink} window, no sinks", nosink_logits))]
    rows[2]["max_logit_diff_vs_gauge"] = (gauge_logits - base_logits).abs().max().item()
    return dict(title=f"perplexity over {total} tokens of pydoc_data.topics (scored after the first {prefill})",
                baseline="-", rows=rows)


def gguf_of(args: argparse.Namespace) -> Path | None:
    """The GGUF file the model was loaded from (the default model's, or `--model FILE.gguf`); None otherwise."""
    if args.random:
        return None
    if not args.model:
        return fetch_gguf()
    path = Path(args.model).expanduser()
    return path if path.suffix == ".gguf" else None


def scenario_llama_cpp(model, gguf: Path | None, quick: bool) -> dict:
    """llama.cpp on the same GGUF file (`gaugecompile.bench.llama_cpp`): a greedy decode step after a long prompt,
    and StreamingLLM steps over a full window, its context shift against a `set_window` step."""
    prompt_len, steps, warm = (64 if quick else 4096), (4 if quick else 16), 3
    window, stream_steps, block = (32 if quick else 4096), (48 if quick else 256), 16
    title = (f"llama.cpp on the same GGUF file: greedy decode after {prompt_len} tokens ({steps} steps after "
             f"{warm}), StreamingLLM {window} window, {stream_steps} steps")
    reason = llama_cpp.unavailable(gguf) if gguf else "the model was not loaded from a GGUF file"
    if reason:
        return dict(title=title, baseline="llama.cpp", skipped=reason)
    threads = torch.get_num_threads()
    cpp = llama_cpp.LlamaCppModel(gguf, n_ctx=max(prompt_len, window + 2 * block) + warm + steps + 64, threads=threads)
    ids = text_ids(TOKENIZER, model.config.vocab_size, prompt_len)
    log(f"llama.cpp: decode after {prompt_len} tokens ({threads} threads)")
    cpp_tokens, cpp_times = cpp.decode(ids[0].tolist(), warm + steps)
    log("llama.cpp: the same with gauge + ManifoldCache")
    eager = model.__class__.forward.__get__(model)
    with torch.no_grad():
        greedy(gauge_forward(model), ids, shared_cache(model), warm, prefill=eager)
        gauge_tokens, gauge_times = greedy(gauge_forward(model), ids, shared_cache(model), warm + steps, prefill=eager)
    pairs = zip(cpp_tokens, gauge_tokens, strict=True)
    same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(cpp_tokens))  # tokens equal up to here
    reads = llama_cpp.bytes_per_token(gguf, model, prompt_len)
    gauge_s, cpp_s = statistics.median(gauge_times[1 + warm:]), statistics.median(cpp_times[warm:])
    rows = [dict(measure="decode step", tokens=prompt_len, gauge_s=gauge_s, baseline_s=cpp_s,
                 ratio=ratio(cpp_s, gauge_s), same_leading_tokens=f"{same}/{warm + steps}",
                 gauge_reads_MB=reads["gauge"] / 1e6, baseline_reads_MB=reads["llama_cpp"] / 1e6)]
    text = text_ids(TOKENIZER, model.config.vocab_size, block + window + stream_steps, seed=1)
    log(f"llama.cpp: streaming, first block kept + {window} window, {stream_steps} steps, a context shift per {block}")
    cpp_stream, cpp_shifted = cpp.stream(text[0].tolist(), keep=block, window=window, block=block)
    log("llama.cpp: the same stream with gauge + ManifoldCache (set_window)")
    _, g_times, lengths = stream_gauge(gauge_forward(model), model, text, sink=block, window=window + 1,
                                       cache=shared_cache(model), block_size=block)
    g_stream = g_times[1:]  # the prefill (the first `block + window` tokens, as for llama.cpp) is not a step
    g_evicted = [now < before for before, now in zip(lengths, lengths[1:], strict=False)]
    skip = min(16, stream_steps // 4)  # the first steps (the decode graph may compile for a new length)
    g_plain, g_shift = llama_cpp.median_plain_and_shift(g_stream[skip:], g_evicted[skip:])
    c_plain, c_shift = llama_cpp.median_plain_and_shift(cpp_stream[skip:], cpp_shifted[skip:])
    rows += [
        dict(measure="stream step, no eviction (median)", tokens=window, gauge_s=g_plain, baseline_s=c_plain,
             ratio=ratio(c_plain, g_plain)),
        dict(measure=f"stream step evicting {block} tokens (median)", tokens=window, gauge_s=g_shift,
             baseline_s=c_shift, ratio=ratio(c_shift, g_shift)),
        dict(measure="eviction alone (evicting step - plain step; below the noise where <= 0)", tokens=window,
             gauge_s=g_shift - g_plain, baseline_s=c_shift - c_plain,
             ratio=ratio(c_shift - c_plain, g_shift - g_plain) if min(c_shift - c_plain, g_shift - g_plain) > 0
             else None),
        dict(measure="stream, mean per step", tokens=window, gauge_s=statistics.mean(g_stream[skip:]),
             baseline_s=statistics.mean(cpp_stream[skip:]),
             ratio=ratio(statistics.mean(cpp_stream[skip:]), statistics.mean(g_stream[skip:]))),
    ]
    return dict(title=title, baseline=f"llama.cpp (llama-cpp-python {cpp.version}, {threads} threads, f16 KV)",
                rows=rows)


# ----------------------------------------------------------------------------- output

TOKENIZER = None
SHARED_TOKENS = 4 * (4096 + 64)  # the largest real-model scenario: 4 beams over 4k tokens


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(platform=platform.platform(), cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                python=platform.python_version())


def print_tables(results: dict) -> None:
    for key, scenario in results["scenarios"].items():
        print(f"\n## {key}: {scenario['title']}  (baseline: {scenario['baseline']})")
        if "error" in scenario:
            print(f"  failed: {scenario['error']}")
            continue
        if "skipped" in scenario:
            print(f"  skipped: {scenario['skipped']}")
            continue
        rows = scenario["rows"]
        cols = list(dict.fromkeys(c for row in rows for c in row))
        cells = [[_fmt(c, row.get(c)) for c in cols] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in cells:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))


def _fmt(column: str, value) -> str:
    if value is None:
        return "-"
    if column.endswith("_s"):
        return f"{value * 1e3:.3f} ms"
    if column == "ratio":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _save(fig, ax, path: Path) -> str:
    """Legend, layout, PNG; returns the file name."""
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path.name


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    reorg = results["scenarios"].get("1_reorganisation", {}).get("rows")
    if reorg:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for op in dict.fromkeys(r["op"] for r in reorg):
            pts = [r for r in reorg if r["op"] == op]
            ax.plot([r["tokens"] for r in pts], [r["gauge_s"] * 1e3 for r in pts], "o-", label=f"{op} (gauge)")
            ax.plot([r["tokens"] for r in pts], [r["baseline_s"] * 1e3 for r in pts], "x--", label=f"{op} (baseline)")
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per operation",
               title="Cache reorganisation cost")
        written.append(_save(fig, ax, out / "reorganisation.png"))
    decode = [r for r in results["scenarios"].get("6_decode_attention", {}).get("rows", []) if "32/8" in r["shape"]]
    if decode:
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in dict.fromkeys(r["table"] for r in decode):
            pts = [r for r in decode if r["table"] == kind]
            ax.plot([r["tokens"] for r in pts], [r["gauge_s"] * 1e3 for r in pts], "o-", label=f"gauge, {kind}")
            ax.plot([r["tokens"] for r in pts], [r["torch_loop_s"] * 1e3 for r in pts], ":",
                    label=f"torch loop, {kind}")
        pts = [r for r in decode if r["table"] == "contiguous"]
        ax.plot([r["tokens"] for r in pts], [r["baseline_s"] * 1e3 for r in pts], "x--", color="k", label="read floor")
        ax.plot([r["tokens"] for r in pts], [r["sdpa_contiguous_s"] * 1e3 for r in pts], "s-.",
                label="SDPA, contiguous")
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per call (32/8 heads, d 128)",
               title="Decode attention")
        written.append(_save(fig, ax, out / "decode_attention.png"))
    plt.close("all")
    return written


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (random Llama unless --model)")
    parser.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    parser.add_argument("--only", type=int, nargs="+", choices=range(1, 10), metavar="N",
                        help="run only these scenarios (1-9)")
    add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    global TOKENIZER
    args = args or build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick and not args.model and not args.random:
        args.random = "llama"
    log("loading the model")
    model, TOKENIZER = model_from_args(args)
    scenarios = {
        1: ("1_reorganisation", lambda: scenario_reorg(args.quick)),
        2: ("2_beam_search", lambda: scenario_beam(model, args.quick)),
        3: ("3_streaming", lambda: scenario_streaming(model, args.quick)),
        4: ("4_document_reuse", lambda: scenario_document(model, args.quick)),
        5: ("5_memory", lambda: scenario_memory(model, args.quick)),
        6: ("6_decode_attention", lambda: scenario_decode(args.quick)),
        7: ("7_perplexity", lambda: scenario_perplexity(model, args.quick)),
        8: ("8_chat_decode", lambda: scenario_chat(model, args.quick)),
        9: ("9_llama_cpp", lambda: scenario_llama_cpp(model, gguf_of(args), args.quick)),
    }
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=machine(), quick=args.quick,
                   model=args.random and f"random {args.random}" or args.model or "SmolLM2-135M-Instruct",
                   versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                 gaugecompile=gaugecompile.__version__), scenarios={})
    failed = 0
    for number, (key, fn) in scenarios.items():
        if args.only and number not in args.only:
            continue
        log(f"scenario {key}")
        start = time.perf_counter()
        try:
            results["scenarios"][key] = fn()
        except Exception as exc:  # keep the other figures; the failure is recorded and makes the exit code 1
            failed += 1
            results["scenarios"][key] = dict(title=key, baseline="-", error=f"{type(exc).__name__}: {exc}")
        results["scenarios"][key]["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    written = plot(results, out)
    print(f"\nwrote {out / 'results.json'}" + "".join(f", {out / name}" for name in written))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
