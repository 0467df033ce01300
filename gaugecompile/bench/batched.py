"""Batched generation of unequal prompts, and a stream of requests sharing a header: the gauge paths against
transformers' own, side by side in one run (`python benchmarks/batched_generation.py --help`).

Scenario A, a padded batch (`tokenizer(padding=True)` then `generate()`): prompts of mixed lengths, greedy, a fixed
number of new tokens each; tokens per second (rows x new tokens / wall time of `generate()`, the prefill included)
for DynamicCache eager, StaticCache with the forward compiled by Inductor, transformers' continuous batching
(`generate_batch`, where it runs on this machine), the gauge backend's `generate()` over a ManifoldCache and
`gaugecompile.batching.generate_batch`.  Every compiled variant runs once to compile, then is timed.

Scenario B, a stream: requests arriving at a fixed gap, half of them starting with a shared header; total time and
mean time to first token, for `generate_batch` (header prefilled once) against DynamicCache eager serving them in
arrival-ordered padded batches (each batch takes what has arrived when the previous one ends).

Tokens are compared with DynamicCache eager's; the gauge rows also give the attention calls that ran the kernel
and those that fell back to the gather (`gaugecompile.ops.counters`).  Never run while anything else runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from ..batching import BatchStats, generate_batch
from ..cache import ManifoldCache
from ..models import add_model_arguments, model_from_args
from ..ops.counters import runs
from .measure import machine
from .prompts import text_ids

__all__ = ["main"]


class _FirstCall(LogitsProcessor):
    """Records when generate() first scores a token: the batch's time to first token."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def _padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return ids, mask


def _generate(model, prompts, new_tokens, cache=None, processor=None) -> tuple[float, list[list[int]]]:
    ids, mask = _padded(prompts)
    extra = {"logits_processor": LogitsProcessorList([processor])} if processor is not None else {}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def scenario_batch(model, prompts: list[list[int]], new_tokens: int, log, only: str | None = None) -> list[dict]:
    """Scenario A: each variant's seconds, tokens per second and whether its tokens equal DynamicCache eager's."""
    rows, total = [], len(prompts) * new_tokens
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    static_len = max(map(len, prompts)) + new_tokens + 8
    inductor = copy.deepcopy(model)
    inductor.forward = torch.compile(inductor.forward)
    gauge = copy.deepcopy(model)
    gauge.compile(backend="gauge")
    gauge_dynamic = copy.deepcopy(model)
    gauge_dynamic.compile(backend="gauge", dynamic=True)
    rows_max = len(prompts)
    manifold = lambda m: ManifoldCache(m, max_batch_size=rows_max + 1, max_tokens=(rows_max + 1) * static_len)  # noqa: E731

    def gauge_batch():
        start = time.perf_counter()
        out = generate_batch(gauge_dynamic, prompts, config, cache=manifold(gauge_dynamic), max_batch_size=rows_max)
        return time.perf_counter() - start, [o.generated_tokens for o in out.values()]

    def transformers_batch():
        start = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        return time.perf_counter() - start, [out[k].generated_tokens for k in sorted(out, key=lambda k: int(
            k.rsplit("_", 1)[-1]))]

    variants = [
        ("DynamicCache eager (padded)", False, lambda: _generate(model, prompts, new_tokens, DynamicCache(
            config=model.config))),
        ("StaticCache + Inductor (padded)", True, lambda: _generate(inductor, prompts, new_tokens, StaticCache(
            config=model.config, max_cache_len=static_len))),
        ("transformers continuous batching", False, transformers_batch),
        ("gauge generate() (padded batch)", True, lambda: _generate(gauge, prompts, new_tokens, manifold(gauge))),
        ("gauge generate_batch", True, gauge_batch),
    ]
    if only:
        keep = only.split(",")
        variants = [v for i, v in enumerate(variants) if i == 0 or any(k in v[0] for k in keep)]
    reference = None
    for name, warm, run in variants:
        log(f"batch: {name}")
        try:
            if warm:
                run()
            runs.clear()
            seconds, tokens = run()
        except Exception as exc:  # noqa: BLE001 -- a baseline that does not run here is reported, not fatal
            rows.append(dict(variant=name, skipped=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            continue
        reference = tokens if reference is None else reference
        row = dict(variant=name, seconds=seconds, tokens_per_s=total / seconds, tokens_equal=tokens == reference)
        if name.startswith("gauge"):
            row.update(kernel_calls=runs["kernel"], fallbacks=runs["masked_fallback"])
        rows.append(row)
        log(f"batch: {row}")
    return rows


def scenario_stream(model, prompts: list[list[int]], new_tokens: int, gap: float, batch: int, log) -> list[dict]:
    """Scenario B: total seconds, mean time to first token and peak KV bytes of each server."""
    arrivals = [i * gap for i in range(len(prompts))]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    gauge = copy.deepcopy(model)
    gauge.compile(backend="gauge", dynamic=True)
    longest = max(map(len, prompts)) + new_tokens + 8
    log("stream: gauge generate_batch (warm-up over the stream's requests and one alone, then timed)")
    generate_batch(gauge, prompts, config, max_batch_size=batch)  # compiles the shapes a server meets once
    generate_batch(gauge, prompts[:1], config, max_batch_size=batch)
    stats = BatchStats()
    cache = ManifoldCache(gauge, max_batch_size=batch + 1, max_tokens=(batch + 1) * longest)
    start = time.perf_counter()
    out = generate_batch(gauge, prompts, config, cache=cache, max_batch_size=batch, arrivals=arrivals, stats=stats)
    gauge_total = time.perf_counter() - start
    gauge_tokens = [o.generated_tokens for o in out.values()]
    gauge_ttft = sum(stats.ttft[k] - a for k, a in zip(out, arrivals, strict=True)) / len(prompts)

    log("stream: DynamicCache eager in arrival-ordered padded batches")
    start, done, ttft, tokens, peak = time.perf_counter(), 0, [], [], 0
    while done < len(prompts):
        now = time.perf_counter() - start
        if arrivals[done] > now:
            time.sleep(arrivals[done] - now)
            now = arrivals[done]
        take = [i for i in range(done, min(done + batch, len(prompts))) if arrivals[i] <= now]
        first = _FirstCall()
        cache = DynamicCache(config=model.config)
        _, out = _generate(model, [prompts[i] for i in take], new_tokens, cache, first)
        ttft += [first.at - start - arrivals[i] for i in take]
        tokens += out
        peak = max(peak, sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4)
        done += len(take)
    baseline_total = time.perf_counter() - start
    return [dict(variant="gauge generate_batch", seconds=gauge_total, mean_ttft_s=gauge_ttft,
                 prefilled_tokens=stats.prefilled_tokens, reused_tokens=stats.reused_tokens,
                 peak_kv_bytes=stats.peak_bytes, tokens_equal=gauge_tokens == tokens,
                 requests_equal=sum(a == b for a, b in zip(gauge_tokens, tokens, strict=True))),
            dict(variant="DynamicCache eager, padded batches", seconds=baseline_total,
                 mean_ttft_s=sum(ttft) / len(ttft), prefilled_tokens=sum(map(len, prompts)), reused_tokens=0,
                 peak_kv_bytes=peak, tokens_equal=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--lengths", default="64,128,256,384,512,1024,1536,2048",
                        help="prompt lengths of the padded batch (default: 8 prompts, 64 to 2048 tokens)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--stream", type=int, default=32, help="requests in the stream (default 32; 0 skips it)")
    parser.add_argument("--header", type=int, default=1024, help="tokens of the header half of them share")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between arrivals (default 0.5)")
    parser.add_argument("--variants", help="comma-separated substrings: run only the batch variants that match "
                        "(DynamicCache eager always runs first: the tokens are compared with it)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    model, tokenizer = model_from_args(args)
    lengths = [int(n) for n in args.lengths.split(",")]
    text = text_ids(tokenizer, model.config.vocab_size, sum(lengths) + args.header + 64 * args.stream)[0].tolist()
    prompts, at = [], 0
    for n in lengths:
        prompts.append(text[at:at + n])
        at += n
    results = dict(machine=machine(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   batch=scenario_batch(model, prompts, args.new_tokens, log, args.variants))
    if args.out:  # each scenario's results are kept as soon as it ends
        args.out.write_text(json.dumps(results, indent=1))
    if args.stream:
        header, own = text[at:at + args.header], text[at + args.header:]
        stream = [(header if i % 2 else []) + own[64 * i:64 * i + 16 + (i * 37) % 48] for i in range(args.stream)]
        results["stream"] = scenario_stream(model, stream, args.new_tokens, args.gap, 8, log)
    for key in ("batch", "stream"):
        for row in results.get(key, []):
            cells = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(f"{key}: " + ", ".join(cells))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0
