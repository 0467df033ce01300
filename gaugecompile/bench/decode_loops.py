"""The decode loops the demo, the benchmark suite and the examples share: gauge and transformers run the same way.

A ManifoldCache sized for a model, the model's forward compiled once with the gauge backend, greedy decoding by
hand with every call timed, an eager prefill (forked into beams), and teacher-forced StreamingLLM over a text,
through ManifoldCache's `set_window` or through the re-rotating sink cache it is compared with.

Compile-friendly by construction: prompts are prefilled eagerly (ManifoldCache materialises exactly), and the
one-token decode step is compiled once per (model, inner compiler) and reused by every caller.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from .baselines import RerotatingSinkCache

__all__ = ["manifold_cache", "gauge_forward", "forward_replaced", "prefilled", "greedy", "median_step",
           "stream_gauge", "stream_baseline"]


def manifold_cache(model, *, batch: int = 1, max_tokens: int, block_size: int = 16):
    """A ManifoldCache for `model`, built from the model: its dtype, and the basis a cast model rotates in."""
    from ..cache import ManifoldCache

    return ManifoldCache(model, max_batch_size=batch, max_tokens=max_tokens, block_size=block_size,
                         device=model.device)


def gauge_forward(model, *, inner: str = "inductor", report_sink: list | None = None) -> Callable:
    """`model.forward` compiled with the gauge backend, one per (model, inner): every caller reuses its graphs.

    ManifoldCache hands lengths to the graph as dynamic sizes, so one decode graph per batch size serves
    every step (automatic dynamic shapes; `dynamic=True` would also make the floats symbolic, which makes
    Dynamo trace the 30 layers twice). `report_sink` (a list) collects the passes' reports of every graph this
    compiled forward compiles (a compile-cache hit replays the reports stored with it), so it makes a separate
    compiled forward.
    """
    # kept on the model (a name only this function uses): the compiled forward holds the model, so a cache keyed
    # by the model elsewhere would keep both alive; on the model they go together
    compiled = model.__dict__.setdefault("_gauge_compiled", {})
    if report_sink is None and inner in compiled:
        return compiled[inner]
    options: dict = {"inner": inner}
    if report_sink is not None:
        options["report_sink"] = report_sink
    forward = torch.compile(model.forward, backend="gauge", options=options)
    if report_sink is None:
        compiled[inner] = forward
    return forward


@contextlib.contextmanager
def forward_replaced(model, forward: Callable) -> Iterator[None]:
    """Let `model.generate` call `forward` (e.g. a compiled one) instead of the eager method."""
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@torch.no_grad()
def prefilled(model, cache, ids: torch.Tensor, rows: int = 1):
    """Prefill `ids` ([1, n]) eagerly into `cache` (ManifoldCache: one new sequence, forked to `rows`; a transformers
    cache: repeated to `rows`) and return the cache. Prompts run eagerly; only the decode step is compiled."""
    if hasattr(cache, "new_sequences"):
        cache.new_sequences(1)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        if rows > 1:
            cache.fork(cache.batch[0], rows - 1)
    else:
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
    return cache


@torch.no_grad()
def greedy(forward: Callable, input_ids: torch.Tensor, cache, steps: int, *,
           prefill: Callable | None = None) -> tuple[list[int], list[float]]:
    """Greedy decoding by hand: prefill (with `prefill`, default `forward`), then `steps` one-token steps with
    `forward`; returns the new tokens and the seconds of every call (prefill first)."""
    if hasattr(cache, "new_sequences") and not cache.batch:
        cache.new_sequences(1)  # a compiled forward must not learn the row count inside the layers
    times, tokens = [], []
    ids = input_ids
    for index in range(steps + 1):
        fn = prefill if index == 0 and prefill is not None else forward
        start = time.perf_counter()
        logits = fn(input_ids=ids, past_key_values=cache, use_cache=True).logits
        times.append(time.perf_counter() - start)
        ids = logits[:, -1:].argmax(-1)
        tokens.append(int(ids[0, 0]))
    return tokens[:steps], times


def median_step(times: list[float]) -> float:
    """Median decode-step time of `greedy`'s `times` (the first call, the prefill, is left out)."""
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


@torch.no_grad()
def stream_gauge(forward: Callable, model, ids: torch.Tensor, *, sink: int, window: int, cache=None,
                 block_size: int = 16) -> tuple[torch.Tensor, list[float], list[int]]:
    """Teacher-forced StreamingLLM over `ids` with ManifoldCache's `set_window(sink, window - 1)` policy (an
    O(blocks) table edit after every forward, block-granular: the blocks holding the first `sink` tokens and
    the fewest recent blocks holding `window - 1` tokens). The first `sink + window - 1` tokens are prefilled
    eagerly, every later token is one `forward` step. Returns next-token logits, seconds per call (prefill
    first) and the tokens held after every call (the baseline replays these evictions). `cache` (reset here)
    lets callers reuse one cache, and with it the compiled graphs."""
    prefill = sink + window - 1
    if cache is None:
        cache = manifold_cache(model, max_tokens=sink + window + 4 * block_size, block_size=block_size)
    cache.reset()
    cache.set_window(0, None)
    cache.new_sequences(1)
    logits, times, lengths = [], [], []
    for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]:
        fn = model if start == 0 else forward
        t0 = time.perf_counter()
        # a contiguous copy: the compiled step is guarded on the strides it was compiled for
        logits.append(fn(input_ids=ids[:, start:end].clone(), past_key_values=cache, use_cache=True).logits[:, -1])
        # the window policy applied between steps (a persistent policy would evict inside the last layer,
        # which splits a compiled graph); the same table edit, part of the timed step
        cache.set_window(sink, window - 1)
        cache.set_window(0, None)
        times.append(time.perf_counter() - t0)
        lengths.append(cache.seq_len(cache.batch[0]))
    return torch.cat(logits), times, lengths


@torch.no_grad()
def stream_baseline(model, ids: torch.Tensor, *, sink: int, window: int,
                    lengths: list[int] | None = None, block_size: int = 16) -> tuple[torch.Tensor, list[float]]:
    """The same stream through the re-rotating sink cache. With `lengths` (from `stream_gauge`) it evicts
    exactly the tokens ManifoldCache evicted (its sinks are whole blocks of `block_size`); without, it keeps
    `sink + window - 1` tokens as SinkCache did."""
    prefill = sink + window - 1
    steps = [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]
    if lengths is not None and len(lengths) != len(steps):
        raise ValueError(f"lengths: expected {len(steps)} entries (one per step), got {len(lengths)}")
    if lengths is not None:
        sink, window = -(-sink // block_size) * block_size, ids.shape[1]
    cache = RerotatingSinkCache.for_model(model, num_sink_tokens=sink, window_length=window)
    logits, times = [], []
    for index, (start, end) in enumerate(steps):
        t0 = time.perf_counter()
        logits.append(model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True).logits[:, -1])
        if lengths is not None and cache.get_seq_length() > lengths[index]:
            cache.shift(cache.get_seq_length() - lengths[index])
        times.append(time.perf_counter() - t0)
    return torch.cat(logits), times
