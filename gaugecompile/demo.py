"""`gaugecompile demo`: the gauge backend + ManifoldCache on a real model, side by side with transformers.

Five steps, each a function returning one `Row` of the final table:
1. compile report: which attention sites the gauge passes rewrite;
2. chat answer, greedy: gauge + ManifoldCache against `DynamicCache` eagerly (tokens must be equal);
3. beam search, 4 beams, both ways;
4. StreamingLLM (sinks + window) over a long text against a re-rotating sink cache;
5. document reuse: a document prefilled once at position 0, spliced into two prompts.
The helpers (greedy loop, compiled forward, text source) are shared with `benchmarks/run.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .baselines import RerotatingSinkCache, append_rerotated, rope_of_model
from .models import add_model_arguments, model_from_args

__all__ = ["Row", "add_arguments", "run", "greedy", "gauge_forward", "manifold_cache", "text_ids", "format_table"]

QUESTION = "What is the capital of France? Answer in one sentence."


@dataclass
class Row:
    """One line of the final table; times in seconds (None where not measured)."""

    scenario: str
    parity: str
    gauge_s: float | None = None
    baseline_s: float | None = None
    unit: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.gauge_s and self.baseline_s:
            return self.baseline_s / self.gauge_s
        return None


def format_table(rows: list[Row], baseline_name: str = "baseline") -> str:
    """A plain-text table: scenario, parity, gauge time, baseline time, ratio (baseline / gauge)."""

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.2f} ms"

    head = ("scenario", "parity", "gauge", baseline_name, "ratio", "per")
    body = [(r.scenario, r.parity, ms(r.gauge_s), ms(r.baseline_s), "-" if r.ratio is None else f"{r.ratio:.2f}x",
             r.unit) for r in rows]
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared helpers


def manifold_cache(model, *, batch: int = 1, max_tokens: int, block_size: int = 16):
    """A ManifoldCache for `model` (ImportError until the cache exists in this build)."""
    from .cache import ManifoldCache

    return ManifoldCache(model.config, max_batch_size=batch, max_tokens=max_tokens, block_size=block_size,
                         dtype=model.dtype, device=model.device)


def gauge_forward(model, **options) -> Callable:
    """`model.forward` compiled with the gauge backend (dynamic shapes: caches grow every step)."""
    if options:
        return torch.compile(model.forward, backend="gauge", dynamic=True, options=options)
    return torch.compile(model.forward, backend="gauge", dynamic=True)


@contextlib.contextmanager
def forward_replaced(model, forward: Callable) -> Iterator[None]:
    """Let `model.generate` call `forward` (e.g. a compiled one) instead of the eager method."""
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@torch.no_grad()
def greedy(forward: Callable, input_ids: torch.Tensor, cache, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by hand: prefill, then `steps` one-token steps; returns tokens and seconds per call."""
    times, tokens = [], []
    ids = input_ids
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = forward(input_ids=ids, past_key_values=cache, use_cache=True).logits
        times.append(time.perf_counter() - start)
        ids = logits[:, -1:].argmax(-1)
        tokens.append(int(ids[0, 0]))
    return tokens[:steps], times


def text_ids(tokenizer, vocab_size: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """`length` token ids of real English text (pydoc_data.topics); random ids without a tokenizer."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: length * 8], return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"length: pydoc_data.topics gives only {ids.shape[1]} tokens, asked {length}")
    return ids


def chat_ids(tokenizer, vocab_size: int, message: str, *, seed: int = 1) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(0, vocab_size, (1, 24), generator=torch.Generator().manual_seed(seed))
    messages = [{"role": "user", "content": message}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).input_ids


def decode(tokenizer, tokens: list[int]) -> str:
    return repr(tokenizer.decode(tokens, skip_special_tokens=True)) if tokenizer is not None else str(tokens)


def median_step(times: list[float]) -> float:
    """Median decode-step time (the first call, prefill plus any compilation, is left out)."""
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


# ----------------------------------------------------------------------------- the five steps


@dataclass
class Context:
    model: torch.nn.Module
    tokenizer: object
    forward: Callable  # gauge-compiled model.forward
    new_tokens: int
    stream_window: int
    stream_steps: int


def step_compile_report(ctx: Context) -> Row:
    from . import explain

    n_layers = ctx.model.config.num_hidden_layers
    ids = chat_ids(ctx.tokenizer, ctx.model.config.vocab_size, QUESTION)
    cache = manifold_cache(ctx.model, max_tokens=ids.shape[1] + 16)
    with torch.no_grad():
        ctx.model(input_ids=ids, past_key_values=cache, use_cache=True)  # explain a decode step
        start = time.perf_counter()
        report = explain(ctx.model, input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    elapsed = time.perf_counter() - start
    print(report)
    found = len(report.rewritten)
    return Row("1 compile report", f"{found}/{n_layers} rewritten" + ("" if found == n_layers else " (!)"),
               elapsed, None, "compile")


def step_chat(ctx: Context) -> Row:
    ids = chat_ids(ctx.tokenizer, ctx.model.config.vocab_size, QUESTION)
    steps = ctx.new_tokens
    progress(f"chat: {steps} greedy tokens, gauge + ManifoldCache (first call compiles)")
    gauge_tokens, gauge_times = greedy(ctx.forward, ids, manifold_cache(ctx.model, max_tokens=ids.shape[1] + steps + 1),
                                       steps)
    progress("chat: eager DynamicCache")
    base_tokens, base_times = greedy(ctx.model.forward, ids, DynamicCache(config=ctx.model.config), steps)
    print(f"  gauge + ManifoldCache : {decode(ctx.tokenizer, gauge_tokens)}")
    print(f"  eager DynamicCache    : {decode(ctx.tokenizer, base_tokens)}")
    return Row("2 chat (greedy)", "tokens equal" if gauge_tokens == base_tokens else "TOKENS DIFFER",
               median_step(gauge_times), median_step(base_times), "step")


def step_beam(ctx: Context, beams: int = 4) -> Row:
    model, ids, steps = ctx.model, chat_ids(ctx.tokenizer, ctx.model.config.vocab_size, QUESTION), ctx.new_tokens
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
                  max_new_tokens=steps, min_new_tokens=steps, early_stopping=False, pad_token_id=0)
    progress(f"beam search: {beams} beams x {steps} tokens, gauge + ManifoldCache")
    with torch.no_grad(), forward_replaced(model, ctx.forward):
        cache = manifold_cache(model, batch=beams, max_tokens=beams * (ids.shape[1] + steps + 16))
        model.generate(**kwargs, past_key_values=cache)  # warm-up: compiles every shape the loop meets
        cache = manifold_cache(model, batch=beams, max_tokens=beams * (ids.shape[1] + steps + 16))
        start = time.perf_counter()
        gauge_out = model.generate(**kwargs, past_key_values=cache)
        gauge_s = (time.perf_counter() - start) / steps
    progress("beam search: eager DynamicCache")
    with torch.no_grad():
        start = time.perf_counter()
        base_out = model.generate(**kwargs, past_key_values=DynamicCache(config=model.config))
        base_s = (time.perf_counter() - start) / steps
    print(f"  best beam, gauge : {decode(ctx.tokenizer, gauge_out[0, ids.shape[1]:].tolist())}")
    print(f"  best beam, eager : {decode(ctx.tokenizer, base_out[0, ids.shape[1]:].tolist())}")
    equal = torch.equal(gauge_out, base_out)
    return Row(f"3 beam search ({beams} beams)", "tokens equal" if equal else "TOKENS DIFFER", gauge_s, base_s, "step")


@torch.no_grad()
def stream_gauge(forward: Callable, model, ids: torch.Tensor, *, sink: int, window: int,
                 block_size: int = 4) -> tuple[torch.Tensor, list[float], list[int]]:
    """Teacher-forced StreamingLLM over `ids` with ManifoldCache's `set_window(sink, window - 1)` policy (an
    O(blocks) table edit after every forward, block-granular: the blocks holding the first `sink` tokens and
    the fewest recent blocks holding `window - 1` tokens). Returns next-token logits, seconds per step, and
    the tokens held after every step (the baseline replays these evictions)."""
    prefill = sink + window - 1
    cache = manifold_cache(model, max_tokens=sink + window + 4 * block_size, block_size=block_size)
    cache.set_window(sink, window - 1)
    logits, times, lengths = [], [], []
    for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]:
        t0 = time.perf_counter()
        logits.append(forward(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True).logits[:, -1])
        times.append(time.perf_counter() - t0)
        lengths.append(cache.seq_len(cache.batch[0]))
    return torch.cat(logits), times, lengths


@torch.no_grad()
def stream_baseline(model, ids: torch.Tensor, *, sink: int, window: int,
                    lengths: list[int] | None = None, block_size: int = 4) -> tuple[torch.Tensor, list[float]]:
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


def step_streaming(ctx: Context, sink: int = 4) -> Row:
    model, window = ctx.model, ctx.stream_window
    ids = text_ids(ctx.tokenizer, model.config.vocab_size, sink + window + ctx.stream_steps)
    progress(f"streaming: {sink} sinks + {window} window, {ctx.stream_steps} steps past the window, gauge")
    gauge_logits, gauge_times, lengths = stream_gauge(ctx.forward, model, ids, sink=sink, window=window)
    progress("streaming: re-rotating sink cache (eager)")
    base_logits, base_times = stream_baseline(model, ids, sink=sink, window=window, lengths=lengths)
    diff = (gauge_logits - base_logits).abs().max().item()
    agree = (gauge_logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
    return Row(f"4 streaming ({sink}+{window})", f"max|dlogit| {diff:.1e}, argmax {agree:.0%}",
               median_step(gauge_times), median_step(base_times), "step")


def step_document(ctx: Context) -> Row:
    model, tok = ctx.model, ctx.tokenizer
    vocab = model.config.vocab_size
    doc = text_ids(tok, vocab, 256, seed=2)
    if tok is not None:
        prefixes = [tok("You are a careful assistant. Read the document below.\n", return_tensors="pt").input_ids,
                     tok("Summarise for a beginner. Here is some reference text:\n\n", return_tensors="pt").input_ids]
        question = tok("\n\nQuestion: what is this text about? Answer in one sentence.\nAnswer:",
                       return_tensors="pt").input_ids
    else:
        prefixes = [torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)) for n in (13, 29)]
        question = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(3))
    # splice needs a block-aligned position: pad each prefix with newlines (a space-like token) to 16k tokens
    pad = tok("\n", add_special_tokens=False).input_ids[-1] if tok is not None else 0
    prefixes = [torch.cat([p, torch.full((1, -p.shape[1] % 16), pad)], dim=1) for p in prefixes]
    steps = min(ctx.new_tokens, 12)
    progress("document reuse: prefill the document once at position 0")
    longest = max(p.shape[1] for p in prefixes) + doc.shape[1] + question.shape[1] + steps
    cache = manifold_cache(model, max_tokens=doc.shape[1] + longest + 64)
    chunk = cache.prefill(ctx.forward, doc)
    rope = rope_of_model(model)
    doc_dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=doc, past_key_values=doc_dynamic, use_cache=True)
    gauge_ttft, base_ttft, diffs = [], [], []
    for prefix in prefixes:
        at = prefix.shape[1]
        cache.reset()  # frees the previous prompt's sequence; the chunk keeps the document's blocks
        start = time.perf_counter()
        with torch.no_grad():
            ctx.forward(input_ids=prefix, past_key_values=cache, use_cache=True)
            cache.splice(cache.batch[0], chunk, at)
            logits = ctx.forward(input_ids=question, past_key_values=cache, use_cache=True).logits[:, -1]
        gauge_ttft.append(time.perf_counter() - start)
        rest, _ = greedy(ctx.forward, logits.argmax(-1, keepdim=True), cache, steps - 1)
        answer = [int(logits.argmax())] + rest
        # exactness: the same prompt with the document's eager keys re-rotated to `at`, in a DynamicCache
        with torch.no_grad():
            reference = DynamicCache(config=model.config)
            model(input_ids=prefix, past_key_values=reference, use_cache=True)
            append_rerotated(reference, doc_dynamic, at, rope)
            ref_logits = model(input_ids=question, past_key_values=reference, use_cache=True).logits[:, -1]
        diffs.append((logits - ref_logits).abs().max().item())
        full = torch.cat([prefix, doc, question], dim=1)
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=full, use_cache=True, past_key_values=DynamicCache(config=model.config))
        base_ttft.append(time.perf_counter() - start)
        base_answer, _ = greedy(model.forward, full, DynamicCache(config=model.config), steps)
        print(f"  prefix of {at} tokens, document spliced at {at}:")
        print(f"    spliced    : {decode(tok, answer)}")
        print(f"    re-prefill : {decode(tok, base_answer)}")
    print(f"  Note: splicing equals re-rotating the document's cached keys to the new position (max |dlogit| "
          f"{max(diffs):.1e}); it is not a full re-prefill: the document's tokens did not attend to the new "
          "prefix, so its answers may differ from the re-prefilled ones.")
    return Row("5 document reuse (TTFT)", f"= re-rotated chunk, max|dlogit| {max(diffs):.1e}",
               statistics.mean(gauge_ttft), statistics.mean(base_ttft), "first token")


STEPS: tuple[tuple[str, Callable[[Context], Row]], ...] = (
    ("compile report", step_compile_report),
    ("chat", step_chat),
    ("beam search", step_beam),
    ("streaming", step_streaming),
    ("document reuse", step_document),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens to generate per answer (default 12)")
    parser.add_argument("--window", type=int, default=256, help="streaming window in tokens (default 256)")
    parser.add_argument("--stream-steps", type=int, default=64, help="streaming steps past the window (default 64)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="compiler behind the gauge passes (default inductor)")


def run(args: argparse.Namespace) -> int:
    for name in ("new_tokens", "window", "stream_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    begin = time.perf_counter()
    progress("loading the model")
    model, tokenizer = model_from_args(args)
    rope_of_model(model)  # the sink baseline needs a Llama-family rotary module: fail before any work
    forward = gauge_forward(model) if args.inner == "inductor" else gauge_forward(model, inner=args.inner)
    ctx = Context(model, tokenizer, forward, args.new_tokens, args.window,
                  args.stream_steps)
    rows: list[Row] = []
    for index, (name, step) in enumerate(STEPS, 1):
        progress(f"step {index}/{len(STEPS)}: {name}")
        print(f"\n== {index}. {name}")
        try:
            rows.append(step(ctx))
        except ImportError as exc:  # a part of the package this build does not have yet
            print(f"  skipped: {exc}")
            rows.append(Row(f"{index} {name}", f"skipped ({exc.name or exc})"))
    print("\n" + format_table(rows, "transformers"))
    print(f"\n(ratio = baseline time / gauge time; total {time.perf_counter() - begin:.0f} s)")
    return 0 if all("DIFFER" not in r.parity and "(!)" not in r.parity for r in rows) else 1
