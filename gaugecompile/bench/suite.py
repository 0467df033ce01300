"""gaugecompile benchmark suite: every scenario is gauge against the real alternative, in the same process.

    gaugecompile bench [--quick] [--out DIR] [--model PATH | --random ARCH] [--only N ...]

Writes DIR/results.json (every figure, machine, versions, date), prints a table and draws PNG plots of
cost against context length. `--quick` runs CI-sized versions (a random Llama unless --model is given).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, StaticCache

from gaugecompile.bench import llama_cpp
from gaugecompile.bench.baselines import append_rerotated, rope_of_model
from gaugecompile.bench.compressed import scenario_compressed
from gaugecompile.bench.decode_loops import (
    forward_replaced,
    gauge_forward,
    greedy,
    manifold_cache,
    median_step,
    prefilled,
    stream_baseline,
    stream_gauge,
)
from gaugecompile.bench.gguf_variants import gguf_variants
from gaugecompile.bench.measure import log, machine, ratio, timed
from gaugecompile.bench.precision import scenario_precision
from gaugecompile.bench.prompts import text_ids
from gaugecompile.bench.report import plot, print_tables
from gaugecompile.bench.synthetic import scenario_decode, scenario_reorg
from gaugecompile.cache import ManifoldCache
from gaugecompile.models import add_model_arguments, model_from_args
from gaugecompile.models.smollm import default_checkpoint, fetch_gguf

TOKENIZER = None  # the loaded model's tokenizer (None for a random model), set by main
SHARED_TOKENS = 4 * (4096 + 64)  # the largest real-model scenario: 4 beams over 4k tokens


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
        cache.transactions.begin_forward(rows, 1)
        times.append(time.perf_counter() - start)
        cache.settle()  # roll the placed token back: every repeat plans the same step
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


def precision_ggufs(args: argparse.Namespace) -> list[Path] | str:
    """The GGUF files scenario 10 runs llama.cpp on (the default model: F16, Q8_0, Q4_0 written from its checkpoint
    beside the shipped Q4_1; `--model FILE.gguf`: that file), or why llama.cpp cannot run."""
    gguf = gguf_of(args)
    reason = llama_cpp.unavailable(gguf) if gguf else "the model was not loaded from a GGUF file"
    if reason:
        return reason
    if args.model:
        return [gguf]
    log("precision: GGUF files of the checkpoint at F16, Q8_0 and Q4_0 (written once into the user cache)")
    return gguf_variants(default_checkpoint(), gguf, gguf.parent)


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


# ----------------------------------------------------------------------------- the run


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (random Llama unless --model)")
    parser.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    parser.add_argument("--only", type=int, nargs="+", choices=range(1, 12), metavar="N",
                        help="run only these scenarios (1-11)")
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
        10: ("10_precision", lambda: scenario_precision(
            model, lambda n: text_ids(TOKENIZER, model.config.vocab_size, n), precision_ggufs(args), args.quick)),
        11: ("11_compressed_kv", lambda: scenario_compressed(
            model, lambda n: text_ids(TOKENIZER, model.config.vocab_size, n), args.quick)),
    }
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=machine(), quick=args.quick,
                   model=args.random and f"random {args.random}" or args.model or "SmolLM2-135M-Instruct",
                   versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                 gaugecompile=importlib.metadata.version("gaugecompile")), scenarios={})
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
