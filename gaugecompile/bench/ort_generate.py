"""Decode with onnxruntime: OrtCausalLM over a ManifoldCache against onnxruntime-genai and the torch model.

    pip install -e ".[bench]"        # onnxruntime-genai, for its model builder and generator
    python benchmarks/ort_generate.py [--contexts 512 4096] [--steps 16]

On SmolLM2-135M-Instruct (float32, CPU), after a prompt of `context` tokens of pydoc_data.topics, the
median time of a greedy decode step (after 3 warm-up steps), all in one process:
- torch eager with transformers' DynamicCache, and with ManifoldCache;
- `OrtCausalLM` (the exported gauge step in stock onnxruntime: its `ai.gauge` node runs the model-local
  function, which gathers and re-rotates the view every step, and the pools go through numpy), and the same
  file with the node bound to the native kernel through onnxruntime-extensions (`fused=True`);
- onnxruntime-genai 0.18 (its builder's fp32 CPU model and its generator), the ecosystem's decode loop.
Then the reorganisations (fused node against onnxruntime-genai): a 4-beam search after the first context (ms per
new token; our first step also runs the prompt's last token), a stored document plus a question to the first
token (ours splices the document's KV, genai re-prefills the prompt), and a sink window (genai has none).
The builder's output is cached next to the checkpoint (`~/.cache/gaugecompile/ortgenai`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _genai_model(checkpoint: Path) -> Path:
    out = checkpoint.parent / "ortgenai" / f"{checkpoint.name}-fp32"
    if not (out / "genai_config.json").is_file():
        print(f"building the onnxruntime-genai model into {out}", flush=True)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o",
                        str(out), "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)
    return out


def _steps_torch(model, cache, ids: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    times, tokens = [], []
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
            t0 = time.perf_counter()
            logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
            times.append(time.perf_counter() - t0)
    return times, tokens


def _steps_genai(path: Path, ids: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + steps + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[0].tolist())
    times, tokens = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - t0)
        tokens.append(int(generator.get_next_tokens()[0]))
    return times, tokens


def _beams_ours(lm, model, ids: torch.Tensor, beams: int, steps: int) -> float:
    """ms per step of a `beams`-beam search of `steps` tokens (after the prompt's prefill, not counted)."""
    from gaugecompile.cache import ManifoldCache

    cache = ManifoldCache(model.config, max_batch_size=beams, max_tokens=ids.shape[1] + 4 * steps * beams)
    with torch.no_grad():
        lm(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
    t0 = time.perf_counter()
    lm.generate(input_ids=ids, past_key_values=cache, max_new_tokens=steps, num_beams=beams, do_sample=False)
    return (time.perf_counter() - t0) * 1e3 / steps


def _beams_genai(path: Path, ids: torch.Tensor, beams: int, steps: int) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + steps, num_beams=beams, do_sample=False,
                              early_stopping=False, min_length=ids.shape[1] + steps)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[0].tolist())  # the prompt's prefill, not counted
    t0 = time.perf_counter()
    n = 0
    while not generator.is_done():
        generator.generate_next_token()
        n += 1
    return (time.perf_counter() - t0) * 1e3 / max(n, 1)


def _spliced_ours(lm, model, doc: torch.Tensor, question: torch.Tensor) -> float:
    """ms to the first token's logits of doc + question, the document's KV taken from a store (prefilled before)."""
    from gaugecompile.cache import ManifoldCache

    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=4 * (doc.shape[1] + question.shape[1]))
    store = cache.prefill(model, doc)
    t0 = time.perf_counter()
    (seq,) = cache.new_sequences(1)
    cache.splice(seq, store, 0)
    with torch.no_grad():
        lm(input_ids=question, past_key_values=cache, use_cache=True)
    return (time.perf_counter() - t0) * 1e3


def _prefill_genai(path: Path, ids: torch.Tensor) -> float:
    """ms to the first token's logits when the whole prompt is prefilled (genai has no way to reuse a document)."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 1, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(ids[0].tolist())
    generator.get_logits()
    return (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    from transformers import DynamicCache

    from gaugecompile.bench.prompts import text_ids
    from gaugecompile.cache import ManifoldCache
    from gaugecompile.models.loading import load
    from gaugecompile.models.smollm import default_checkpoint
    from gaugecompile.onnx import OrtCausalLM

    model, tok = load()
    genai = _genai_model(default_checkpoint())
    warm = 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ort_lm = OrtCausalLM.from_model(model, Path(tmp) / "step.onnx")
        fused_lm = OrtCausalLM(Path(tmp) / "step.onnx", model.config, fused=True)
        for context in args.contexts:
            ids, steps = text_ids(tok, model.config.vocab_size, context), warm + args.steps
            runs = [
                ("torch eager, DynamicCache", _steps_torch, (model, DynamicCache(config=model.config), ids, steps)),
                ("torch eager, ManifoldCache", _steps_torch,
                 (model, ManifoldCache(model.config, max_batch_size=1, max_tokens=context + 64), ids, steps)),
                ("OrtCausalLM (stock onnxruntime)", _steps_torch,
                 (ort_lm, ManifoldCache(model.config, max_batch_size=1, max_tokens=context + 64), ids, steps)),
                ("OrtCausalLM, fused node", _steps_torch,
                 (fused_lm, ManifoldCache(model.config, max_batch_size=1, max_tokens=context + 64), ids, steps)),
                ("onnxruntime-genai", _steps_genai, (genai, ids, steps)),
            ]
            results = {}
            for name, run, run_args in runs:
                print(f"context {context}: {name}", flush=True)
                times, tokens = run(*run_args)
                results[name] = (statistics.median(times[warm:]) * 1e3, tokens)
            base = results["onnxruntime-genai"][0]
            want = results["torch eager, DynamicCache"][1]
            for name, (ms, tokens) in results.items():
                rows.append((context, name, ms, ms / base, tokens == want))
        ids = text_ids(tok, model.config.vocab_size, args.contexts[0] + 16)
        doc, question = ids[:, :args.contexts[0]], ids[:, args.contexts[0]:]
        reorganisations = [
            (f"4-beam search, per step, after {args.contexts[0]} tokens",
             _beams_ours(fused_lm, model, ids[:, :args.contexts[0]], 4, args.steps),
             _beams_genai(genai, ids[:, :args.contexts[0]], 4, args.steps)),
            (f"a stored {args.contexts[0]}-token document + 16-token question, to first token",
             _spliced_ours(fused_lm, model, doc, question), _prefill_genai(genai, ids)),
        ]
    import onnxruntime
    import onnxruntime_genai
    import transformers

    print(f"\nGreedy decode step, SmolLM2-135M-Instruct float32, median of {args.steps} after {warm} warm-up steps; "
          f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"onnxruntime-genai {onnxruntime_genai.__version__}")
    print(f"{'context':>7}  {'method':<34} {'ms/step':>8} {'vs genai':>9}  tokens = torch")
    for context, name, ms, ratio, same in rows:
        print(f"{context:>7}  {name:<34} {ms:>8.1f} {ratio:>8.2f}x  {'yes' if same else 'no'}")
    print(f"\n{'reorganisation':<62} {'OrtCausalLM fused':>18} {'genai':>9} {'genai / ours':>13}")
    for name, ours, theirs in reorganisations:
        print(f"{name:<62} {ours:>15.1f} ms {theirs:>6.1f} ms {theirs / ours:>12.2f}x")
    print("a sink window (StreamingLLM): OrtCausalLM streams it (set_window); onnxruntime-genai has no such cache")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
