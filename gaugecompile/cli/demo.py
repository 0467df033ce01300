"""`gaugecompile demo`: the gauge backend + ManifoldCache on a real model, side by side with transformers.

Six steps, each a function returning one `Row` of the final table:
1. compile report: the decode step compiled once with `backend="gauge"`; which attention sites were rewritten;
2. chat answer, greedy: gauge + ManifoldCache against `DynamicCache` eagerly (tokens must be equal);
3. beam search, 4 beams, both ways;
4. StreamingLLM (sinks + window) over a long text against a re-rotating sink cache;
5. document reuse: a document prefilled once at position 0, spliced into two prompts;
6. the chat answer through onnxruntime: the model exported with `OrtCausalLM.from_model`, prefilled and decoded
   by the file over a ManifoldCache, against eager `DynamicCache` (tokens must be equal).

Compile-friendly by construction: prompts are prefilled eagerly (ManifoldCache materialises exactly),
the one-token decode step is compiled once per batch size and reused by every step and scenario, all
scenarios share one ManifoldCache (same pools, so no recompiles), every timed run is preceded by a
warm-up, and compile time is reported on its own. The decode loops and prompts are
`gaugecompile.bench.decode_loops` and `gaugecompile.bench.prompts`, shared with the benchmark suite.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from ..bench.baselines import append_rerotated, rope_of_model
from ..bench.decode_loops import (
    forward_replaced,
    gauge_forward,
    greedy,
    manifold_cache,
    median_step,
    prefilled,
    stream_baseline,
    stream_gauge,
)
from ..bench.prompts import QUESTION, chat_ids, decode, text_ids
from ..models import add_model_arguments, model_from_args

__all__ = ["Row", "add_arguments", "run", "format_table"]


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


# ----------------------------------------------------------------------------- the six steps


@dataclass
class Context:
    model: torch.nn.Module
    tokenizer: object
    forward: Callable  # gauge-compiled model.forward (its passes' reports go to `reports`)
    cache: object  # one ManifoldCache shared by every scenario (same pools: the compiled graphs are reused)
    new_tokens: int
    stream_window: int
    stream_steps: int
    reports: list = field(default_factory=list)
    compile_s: dict = field(default_factory=dict)
    eager_chat: tuple[list[int], list[float]] | None = None  # eager DynamicCache's chat answer and step times


def _reset(cache) -> None:
    cache.reset()
    cache.set_window(0, None)


def _beam_kwargs(ids: torch.Tensor, beams: int, steps: int) -> dict:
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
                max_new_tokens=steps, min_new_tokens=steps, early_stopping=False, pad_token_id=0)


def _decode_warmup(ctx: Context, rows: int) -> None:
    """Compile the decode step for `rows` rows, as the timed runs will call it (a few steps, so a recompile for a
    grown length also happens here); its wall time is reported as compile time, once per batch size."""
    if rows in ctx.compile_s:
        return
    model, cache = ctx.model, ctx.cache
    ids = chat_ids(ctx.tokenizer, model.config.vocab_size, QUESTION)
    progress(f"compiling the decode step for {rows} row(s) with backend='gauge' (once; reused by every step)")
    _reset(cache)
    start = time.perf_counter()
    with torch.no_grad():
        if rows == 1:
            greedy(ctx.forward, ids, cache, 3, prefill=model)
        else:
            prefilled(model, cache, ids[:, :-1], rows)
            with forward_replaced(model, ctx.forward):
                model.generate(**_beam_kwargs(ids, rows, 3), past_key_values=cache)
    ctx.compile_s[rows] = time.perf_counter() - start
    _reset(cache)


def step_compile_report(ctx: Context) -> Row:
    from ..explain import ExplainReport

    _decode_warmup(ctx, 1)
    report = ExplainReport()
    for graph_report, before, after in ctx.reports:
        report.rewritten += graph_report.rewritten
        report.refused += graph_report.refused
        report.plain_attention += graph_report.plain_attention
        report.graphs_before.append(before)
        report.graphs_after.append(after)
    lines = str(report).splitlines()
    print(lines[0])
    for line, count in collections.Counter(lines[1:]).items():  # one line per distinct site, with its count
        print(f"{line}  [x{count}]" if count > 1 else line)
    n_layers, found = ctx.model.config.num_hidden_layers, len(report.rewritten)
    print(f"  compiling the decode step (warm-up, 3 steps): {ctx.compile_s[1]:.1f} s (once; not in the timings)")
    return Row("1 compile report", f"{found}/{n_layers} rewritten" + ("" if found == n_layers else " (!)"),
               ctx.compile_s[1], None, "compile, once")


def step_chat(ctx: Context) -> Row:
    model, cache = ctx.model, ctx.cache
    ids = chat_ids(ctx.tokenizer, model.config.vocab_size, QUESTION)
    steps = ctx.new_tokens
    progress(f"chat: {steps} greedy tokens, gauge + ManifoldCache (compiled decode step)")
    _reset(cache)
    gauge_tokens, gauge_times = greedy(ctx.forward, ids, cache, steps, prefill=model)
    return _chat_row(ctx, "2 chat (greedy)", "gauge + ManifoldCache", gauge_tokens, gauge_times)


def _chat_row(ctx: Context, scenario: str, label: str, tokens: list[int], times: list[float]) -> Row:
    """The chat answer `tokens` (generated in `times`) against eager `DynamicCache`'s, which is run once per demo
    (every chat row compares with the same run); prints both answers."""
    if ctx.eager_chat is None:
        progress("chat: eager DynamicCache")
        model = ctx.model
        ids = chat_ids(ctx.tokenizer, model.config.vocab_size, QUESTION)
        ctx.eager_chat = greedy(model.forward, ids, DynamicCache(config=model.config), ctx.new_tokens)
    base_tokens, base_times = ctx.eager_chat
    print(f"  {label:<24}: {decode(ctx.tokenizer, tokens)}")
    print(f"  {'eager DynamicCache':<24}: {decode(ctx.tokenizer, base_tokens)}")
    return Row(scenario, "tokens equal" if tokens == base_tokens else "TOKENS DIFFER", median_step(times),
               median_step(base_times), "step")


def step_beam(ctx: Context, beams: int = 4) -> Row:
    model, cache, steps = ctx.model, ctx.cache, ctx.new_tokens
    ids = chat_ids(ctx.tokenizer, model.config.vocab_size, QUESTION)
    kwargs = _beam_kwargs(ids, beams, steps)
    _decode_warmup(ctx, beams)
    print(f"  compiling the {beams}-row decode step (warm-up, 3 steps): {ctx.compile_s[beams]:.1f} s (once)")
    progress(f"beam search: {beams} beams x {steps} tokens, gauge + ManifoldCache (prompt shared by the beams)")
    _reset(cache)
    prefilled(model, cache, ids[:, :-1], beams)  # eagerly (outside forward_replaced); the beams share its blocks
    with torch.no_grad(), forward_replaced(model, ctx.forward):
        start = time.perf_counter()
        gauge_out = model.generate(**kwargs, past_key_values=cache)
        gauge_s = (time.perf_counter() - start) / steps
    progress("beam search: eager DynamicCache")
    with torch.no_grad():
        dynamic = prefilled(model, DynamicCache(config=model.config), ids[:, :-1], beams)
        start = time.perf_counter()
        base_out = model.generate(**kwargs, past_key_values=dynamic)
        base_s = (time.perf_counter() - start) / steps
    print(f"  best beam, gauge : {decode(ctx.tokenizer, gauge_out[0, ids.shape[1]:].tolist())}")
    print(f"  best beam, eager : {decode(ctx.tokenizer, base_out[0, ids.shape[1]:].tolist())}")
    equal = torch.equal(gauge_out, base_out)
    return Row(f"3 beam search ({beams} beams)", "tokens equal" if equal else "TOKENS DIFFER", gauge_s, base_s, "step")


def step_streaming(ctx: Context, sink: int = 4) -> Row:
    model, window = ctx.model, ctx.stream_window
    ids = text_ids(ctx.tokenizer, model.config.vocab_size, sink + window + ctx.stream_steps)
    progress(f"streaming: {sink} sinks + {window} window, {ctx.stream_steps} steps past the window, gauge")
    gauge_logits, gauge_times, lengths = stream_gauge(ctx.forward, model, ids, sink=sink, window=window,
                                                      cache=ctx.cache, block_size=ctx.cache.block_size)
    progress("streaming: re-rotating sink cache (eager)")
    base_logits, base_times = stream_baseline(model, ids, sink=sink, window=window, lengths=lengths,
                                              block_size=ctx.cache.block_size)
    diff = (gauge_logits - base_logits).abs().max().item()
    agree = (gauge_logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
    return Row(f"4 streaming ({sink}+{window})", f"max|dlogit| {diff:.1e}, argmax {agree:.0%}",
               median_step(gauge_times), median_step(base_times), "step")


def step_document(ctx: Context) -> Row:
    model, tok, cache = ctx.model, ctx.tokenizer, ctx.cache
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
    # splice needs a block-aligned position: pad each prefix with newlines (a space-like token) to whole blocks
    bs = cache.block_size
    pad = tok("\n", add_special_tokens=False).input_ids[-1] if tok is not None else 0
    prefixes = [torch.cat([p, torch.full((1, -p.shape[1] % bs), pad)], dim=1) for p in prefixes]
    steps = min(ctx.new_tokens, 12)
    progress("document reuse: prefill the document once at position 0")
    _reset(cache)
    chunk = cache.prefill(model, doc)
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
            prefilled(model, cache, prefix)
            cache.splice(cache.batch[0], chunk, at)
            logits = model(input_ids=question, past_key_values=cache, use_cache=True).logits[:, -1]
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
    chunk.free()
    _reset(cache)
    print(f"  Note: splicing equals re-rotating the document's cached keys to the new position (max |dlogit| "
          f"{max(diffs):.1e}); it is not a full re-prefill: the document's tokens did not attend to the new "
          "prefix, so its answers may differ from the re-prefilled ones.")
    return Row("5 document reuse (TTFT)", f"= re-rotated chunk, max|dlogit| {max(diffs):.1e}",
               statistics.mean(gauge_ttft), statistics.mean(base_ttft), "first token")


def step_onnxruntime(ctx: Context) -> Row:
    """The chat answer generated by onnxruntime (`OrtCausalLM`), prompt and steps alike run by the exported file.

    The `ai.gauge` nodes run the native kernel where onnxruntime-extensions is installed (the fused node), else
    the model-local function in standard ops, which re-materialises the view every step."""
    from ..onnx import OrtCausalLM

    model = ctx.model
    if model.device.type != "cpu":
        return Row("6 onnxruntime chat", f"skipped: OrtCausalLM runs on the CPU, the model is on {model.device}")
    fused = importlib.util.find_spec("onnxruntime_extensions") is not None
    label = f"onnxruntime ({'fused node' if fused else 'function'})"
    if not fused:
        print("  onnxruntime-extensions is not installed: the gauge nodes run their function in standard ops")
    ids = chat_ids(ctx.tokenizer, model.config.vocab_size, QUESTION)
    steps = ctx.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        progress("onnxruntime: exporting the decode step (once; one file serves prefill and every step)")
        start = time.perf_counter()
        ort_lm = OrtCausalLM.from_model(model, Path(tmp) / "step.onnx", block_size=ctx.cache.block_size,
                                        fused=fused)
        print(f"  exporting and loading the step: {time.perf_counter() - start:.1f} s (once; not in the timings)")
        progress(f"onnxruntime chat: {steps} greedy tokens, OrtCausalLM over a ManifoldCache, {label}")
        cache = manifold_cache(model, max_tokens=ids.shape[1] + steps + 4 * ctx.cache.block_size,
                               block_size=ctx.cache.block_size)
        greedy(ort_lm, ids, cache, 3)  # warm-up: onnxruntime plans its first runs of each shape
        cache.reset()
        ort_tokens, ort_times = greedy(ort_lm, ids, cache, steps)
    return _chat_row(ctx, "6 onnxruntime chat", label, ort_tokens, ort_times)


STEPS: tuple[tuple[str, Callable[[Context], Row]], ...] = (
    ("compile report", step_compile_report),
    ("chat", step_chat),
    ("beam search", step_beam),
    ("streaming", step_streaming),
    ("document reuse", step_document),
    ("onnxruntime chat", step_onnxruntime),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens to generate per answer (default 12)")
    parser.add_argument("--window", type=int, default=256, help="streaming window in tokens (default 256)")
    parser.add_argument("--stream-steps", type=int, default=64, help="streaming steps past the window (default 64)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="compiler behind the gauge passes (default inductor)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="leave out step 6 (exporting the model for onnxruntime takes minutes on a real model)")


def run(args: argparse.Namespace) -> int:
    for name in ("new_tokens", "window", "stream_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    begin = time.perf_counter()
    progress("loading the model")
    model, tokenizer = model_from_args(args)
    rope_of_model(model)  # the sink baseline needs a Llama-family rotary module: fail before any work
    reports: list = []
    forward = gauge_forward(model, inner=args.inner, report_sink=reports)
    beams, prompt = 4, chat_ids(tokenizer, model.config.vocab_size, QUESTION).shape[1]
    doc_room = 2 * 256 + 2 * 64 + 2 * (128 + args.new_tokens)
    room = max(beams * (prompt + args.new_tokens + 32), 4 + args.window + 64, doc_room)
    cache = manifold_cache(model, batch=beams, max_tokens=room)
    ctx = Context(model, tokenizer, forward, cache, args.new_tokens, args.window, args.stream_steps, reports)
    rows: list[Row] = []
    steps = [entry for entry in STEPS if not (args.no_onnx and entry[1] is step_onnxruntime)]
    for index, (name, step) in enumerate(steps, 1):
        progress(f"step {index}/{len(steps)}: {name} ({time.perf_counter() - begin:.0f} s so far)")
        print(f"\n== {index}. {name}", flush=True)
        rows.append(step(ctx))
    print("\n" + format_table(rows, "transformers"))
    compile_total = sum(ctx.compile_s.values())
    print(f"\n(ratio = baseline time / gauge time, steady state after a warm-up; compiling the decode step took "
          f"{compile_total:.0f} s in all, for batch sizes {sorted(ctx.compile_s)}; total "
          f"{time.perf_counter() - begin:.0f} s)")
    return 0 if all("DIFFER" not in r.parity and "(!)" not in r.parity for r in rows) else 1
