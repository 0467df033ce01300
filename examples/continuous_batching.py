"""Continuous batching with `gaugecompile.batching.generate_batch`: requests arriving over time join a running batch
and leave it when done, and the system prompt they share is prefilled once.

Shows: every request generates the tokens it generates alone; the shared system prompt's blocks are referenced by
every request that starts with it (tokens reused, blocks at the peak); each request's time to first token.

    python examples/continuous_batching.py                 # SmolLM2-135M-Instruct (fetched once)
    python examples/continuous_batching.py --random llama  # a tiny random model
    python examples/continuous_batching.py --random llama --inner eager --new-tokens 6
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import GenerationConfig

from gaugecompile import ManifoldCache
from gaugecompile.batching import BatchStats, generate_batch
from gaugecompile.models import add_model_arguments, model_from_args
from gaugecompile.ops.counters import runs

SYSTEM = ("You are a careful assistant. Answer in one short paragraph, name your sources when you have them, and say "
          "so when you do not know.")
QUESTIONS = ["What is RoPE?", "Why is the sky blue?", "Name three rivers.", "What is 17 times 3?", "Hello!",
             "What does a KV cache store?"]


def requests(tokenizer, vocab: int) -> list[list[int]]:
    """Chat prompts sharing the system prompt (random ids with a shared header without a tokenizer)."""
    if tokenizer is not None:
        return [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                              add_generation_prompt=True) for q in QUESTIONS]
    g = torch.Generator().manual_seed(0)
    header = torch.randint(2, vocab, (24,), generator=g).tolist()
    return [header + torch.randint(2, vocab, (3 + 2 * i,), generator=g).tolist() for i in range(len(QUESTIONS))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per request (default 16)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="what runs the rewritten graph (default inductor; eager skips Inductor's compile time)")
    args = parser.parse_args(argv)

    model, tokenizer = model_from_args(args)
    prompts = requests(tokenizer, model.config.vocab_size)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    alone = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        alone.append(model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[
            0, len(prompt):].tolist())

    model.compile(backend="gauge", options={"inner": args.inner}, dynamic=True)  # shapes change every step
    cache = ManifoldCache(model, max_batch_size=4, max_tokens=4 * (max(map(len, prompts)) + args.new_tokens + 32))
    arrivals = [0.0, 0.0, 0.0, 0.5, 0.5, 1.0]  # seconds after the call: a stream of requests
    stats = BatchStats()
    runs.clear()
    out = generate_batch(model, prompts, config, cache=cache, max_batch_size=3, arrivals=arrivals, stats=stats)

    ok = True
    for i, (rid, result) in enumerate(out.items()):
        same = result.generated_tokens == alone[i]
        ok &= same
        text = tokenizer.decode(result.generated_tokens) if tokenizer is not None else result.generated_tokens
        print(f"{rid}: arrived {arrivals[i]:.1f} s, first token at {stats.ttft[rid]:.2f} s, "
              f"{'same as alone' if same else 'DIFFERS from alone'}: {text!r}")
    print(f"prompt tokens: {stats.prefilled_tokens} prefilled, {stats.reused_tokens} taken from shared prefixes; "
          f"{stats.steps} steps; peak {stats.peak_blocks} blocks ({stats.peak_bytes / 2**20:.1f} MiB)")
    print(f"attention calls: {runs['kernel']} ran the rotated-query kernel, {runs['masked_fallback']} fell back")
    ok &= stats.reused_tokens > 0 and runs["masked_fallback"] == 0
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
