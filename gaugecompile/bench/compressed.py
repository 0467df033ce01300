"""Compressed KV pools (scenario 11): what `ManifoldCache(model, kv_dtype=...)` costs in quality, saves in memory,
and gains in speed, against float32 pools, side by side in one run.

- quality: the model reads the same text teacher-forced in chunks through a cache of each format (every chunk
  attends over the pools as stored, its own tokens included), and its logits are scored against the text and
  against the float32-pool run: mean NLL and its increase, the mean KL divergence of the next-token distribution,
  and how often the top-1 token is the same;
- memory: bytes a token takes in every layer's pools, scales included;
- decode attention: the op (native kernel) on one layer of 32/8 heads x 128 at 16k and 64k tokens over contiguous,
  one-delta and fragmented tables, for each format, against that format's own read floor (one pass over its bytes,
  codes and scales, in the same run) and against the float32 pools' kernel;
- decode step: the model compiled with `backend="gauge"` over a cache filled to the context length, float32 pools
  against int8 pools (the pools filled with random keys and values: a step's time does not depend on what they
  hold; quality is the first table's).
"""

from __future__ import annotations

import statistics

import torch

from ..cache import ManifoldCache
from ..kv_format import kv_format, quantize
from ..ops import rotated_query_attention
from ..rope import RopeSpec
from .decode_loops import gauge_forward, greedy
from .measure import log, ratio, timed
from .synthetic import decode_tables

__all__ = ["FORMATS", "scenario_compressed", "bytes_floor"]

FORMATS = ("float32", "bfloat16", "float8_e4m3fn", "int8", "int4")


def bytes_floor(tensors: list[torch.Tensor], repeat: int = 7) -> float:
    """Best seconds of one pass over every byte of `tensors`: a max over their bytes (whatever their dtype, so every
    format's floor is measured the same way; a vectorised reduction that runs at a float32 sum's speed here)."""
    raw = [t.view(torch.uint8) for t in tensors]
    return min(timed(lambda: [r.amax() for r in raw], 1) for _ in range(repeat))


@torch.no_grad()
def teacher_forced_logits(model, ids: torch.Tensor, kv_dtype: str, chunk: int) -> torch.Tensor:
    """Logits [n, vocab] (float32) of `ids` [1, n] read in chunks of `chunk` tokens through a cache of `kv_dtype`."""
    cache = ManifoldCache(model, max_batch_size=1, max_tokens=ids.shape[1] + chunk, kv_dtype=kv_dtype)
    cache.new_sequences(1)
    out = []
    for start in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True).logits
        out.append(logits[0].float())
    return torch.cat(out)


def quality_rows(model, ids: torch.Tensor, chunk: int) -> list[dict]:
    """Per format: NLL of the text, its increase over float32 pools, mean KL(float32 || format), top-1 agreement."""
    targets = ids[0, 1:]
    reference = None
    rows = []
    for name in FORMATS:
        log(f"compressed KV quality: {name} pools, {ids.shape[1]} tokens teacher-forced")
        logits = teacher_forced_logits(model, ids, name, chunk)[:-1]
        logp = torch.log_softmax(logits, -1)
        nll = float(torch.nn.functional.nll_loss(logp, targets))
        if reference is None:
            reference = (logp, nll)
        ref_logp, ref_nll = reference
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        top1 = float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean())
        rows.append(dict(kv_dtype=name, nll=nll, nll_increase=nll - ref_nll, kl=kl, top1_agreement=top1))
    return rows


def memory_rows(config) -> list[dict]:
    """Bytes one token takes in every layer's pools (keys and values, scales included), and the ratio to float32."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = {name: 2 * config.num_hidden_layers * config.num_key_value_heads * kv_format(name).bytes_per_row(
        head_dim) for name in FORMATS}
    return [dict(kv_dtype=name, bytes_per_token=b, vs_float32=b / per_token["float32"]) for name, b in
            per_token.items()]


def op_rows(length: int, gen: torch.Generator, repeat: int) -> list[dict]:
    """Decode attention, one layer of 32/8 heads x 128 at `length` tokens, every format and table kind."""
    heads, kv_heads, dim, block = 32, 8, 128, 16
    blocks = length // block
    rope = RopeSpec.from_base(1e4, dim)
    k, v = (torch.randn(blocks, block, kv_heads, dim, generator=gen) for _ in range(2))
    q = torch.randn(1, heads, 1, dim, generator=gen)
    seq = torch.full((1, blocks), block)
    tables = decode_tables(blocks, gen)
    rows, float32_s = [], {}
    for name in FORMATS:
        fmt = kv_format(name)
        (kc, ks), (vc, vs) = quantize(k, fmt), quantize(v, fmt)
        stored = [t for t in (kc, vc, ks, vs) if t is not None]
        nbytes = sum(t.nbytes for t in stored)
        log(f"compressed KV decode attention: {name} pools, {length} tokens")
        floor = bytes_floor(stored)
        for kind, (table, delta) in tables.items():
            def run(table=table, delta=delta, pools=(kc, vc, ks, vs)) -> None:
                rotated_query_attention(q, pools[0], pools[1], table, delta, seq, rope, k_scale=pools[2],
                                        v_scale=pools[3])

            seconds = timed(run, repeat)
            float32_s.setdefault(kind, seconds)
            rows.append(dict(kv_dtype=name, table=kind, tokens=length, gauge_s=seconds, floor_s=floor,
                             times_floor=seconds / floor, vs_float32=seconds / float32_s[kind], kv_bytes=nbytes,
                             gauge_GBps=nbytes / seconds / 1e9, floor_GBps=nbytes / floor / 1e9))
    return rows


@torch.no_grad()
def filled_cache(model, kv_dtype: str, length: int) -> ManifoldCache:
    """A one-row cache of `kv_dtype` holding `length` random tokens in every layer (what a step reads, not what a
    model would have written)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = ManifoldCache(model, max_batch_size=1, max_tokens=length + 256, kv_dtype=kv_dtype)
    cache.new_sequences(1)
    gen = torch.Generator().manual_seed(length)
    for layer in range(config.num_hidden_layers):
        k, v = (torch.randn(1, config.num_key_value_heads, length, head_dim, generator=gen, dtype=model.dtype)
                for _ in range(2))
        cache.update(k, v, layer)
    return cache


@torch.no_grad()
def step_rows(model, length: int, steps: int, inner: str = "inductor") -> list[dict]:
    """The compiled decode step over float32 and int8 pools at `length` tokens of context (median of `steps`)."""
    forward = gauge_forward(model, inner=inner)
    rows, base = [], None
    for name in ("float32", "int8"):
        log(f"compressed KV decode step: {name} pools, {length} tokens (compiling on first use)")
        cache = filled_cache(model, name, length)
        _, times = greedy(forward, torch.tensor([[1]]), cache, steps + 1)
        step = statistics.median(times[2:])  # the first two compile and warm up
        base = base or step
        rows.append(dict(kv_dtype=name, tokens=length, step_s=step, speedup_vs_float32=ratio(base, step),
                         kv_bytes=cache.blocks_in_use * cache.bytes_per_block))
    return rows


def scenario_compressed(model, text, quick: bool) -> dict:
    """Scenario 11: `text(n)` gives n token ids of held-out text."""
    n, chunk = (256, 64) if quick else (4096, 512)
    gen = torch.Generator().manual_seed(11)
    rows = [dict(table="quality", **r) for r in quality_rows(model, text(n), chunk)]
    rows += [dict(table="memory", **r) for r in memory_rows(model.config)]
    for length in ((1024,) if quick else (16384, 65536)):
        rows += [dict(table_kind=r.pop("table"), table="decode attention", **r)
                 for r in op_rows(length, gen, 3 if quick else 7)]
    step = (256, 3, "eager") if quick else (16384, 8, "inductor")
    rows += [dict(table="decode step", **r) for r in step_rows(model, *step)]
    return dict(title=f"compressed KV pools: quality over {n} tokens of pydoc_data.topics, memory, decode speed",
                baseline="float32 pools", rows=rows)
