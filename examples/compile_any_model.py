"""Compile an unmodified transformers model with `backend="gauge"` over a ManifoldCache.

Shows: `gaugecompile.explain` reports which attention sites the passes rewrote into
`gauge::rotated_query_attention` (one per layer), and `torch.compile(model, backend="gauge")` gives the
same logits as eager transformers with a DynamicCache, for the prompt and for a few decode steps.

    python examples/compile_any_model.py                 # SmolLM2-135M-Instruct (fetched once)
    python examples/compile_any_model.py --random llama  # a tiny random model: seconds
    python examples/compile_any_model.py --model PATH --inner eager
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache

import gaugecompile
from gaugecompile.bench.decode_loops import manifold_cache
from gaugecompile.bench.prompts import QUESTION, chat_ids
from gaugecompile.models import add_model_arguments, model_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="compiler behind the gauge passes (default inductor)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps to compare (default 4)")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted |logit difference| (default 1e-3)")
    args = parser.parse_args(argv)

    model, tokenizer = model_from_args(args)
    ids = chat_ids(tokenizer, model.config.vocab_size, QUESTION)
    room = ids.shape[1] + args.steps + 16

    # 1. what the passes rewrote: explain() compiles and runs the prefill once
    cache = manifold_cache(model, max_tokens=room)
    cache.new_sequences(1)  # open the row before the first compiled forward
    report = gaugecompile.explain(model, ids, past_key_values=cache, inner=args.inner)
    print(report)
    layers = model.config.num_hidden_layers
    if len(report.rewritten) != layers or report.refused:
        print(f"FAIL: expected {layers} rewritten sites and none refused", file=sys.stderr)
        return 1

    # 2. compiled logits against eager DynamicCache, teacher-forced on eager's greedy tokens
    compiled = torch.compile(model, backend="gauge", options={"inner": args.inner})
    cache = manifold_cache(model, max_tokens=room)
    cache.new_sequences(1)
    dynamic = DynamicCache(config=model.config)
    worst, tokens, step_ids = 0.0, [], ids
    with torch.no_grad():
        for _ in range(args.steps + 1):
            got = compiled(input_ids=step_ids, past_key_values=cache, use_cache=True).logits[:, -1]
            want = model(input_ids=step_ids, past_key_values=dynamic, use_cache=True).logits[:, -1]
            worst = max(worst, (got - want).abs().max().item())
            if not torch.equal(got.argmax(-1), want.argmax(-1)):
                print(f"FAIL: next token differs after {len(tokens)} steps", file=sys.stderr)
                return 1
            step_ids = want.argmax(-1, keepdim=True)
            tokens.append(int(step_ids))
    text = tokenizer.decode(tokens) if tokenizer is not None else str(tokens)
    print(f"prefill + {args.steps} decode steps: {text!r}, max |logit difference| vs eager {worst:.1e}")
    if worst > args.atol:
        print(f"FAIL: logits differ by {worst:.1e} > {args.atol:.1e}", file=sys.stderr)
        return 1
    print("OK: compiled logits equal eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
