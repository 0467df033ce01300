"""A bfloat16, float16 or weight-quantized model under `backend="gauge"`: greedy tokens equal to its own eager run.

Shows: `model.to(torch.bfloat16)` (or `.half()`, or torchao's `quantize_(model, Int8WeightOnlyConfig())`) and then
`model.compile(backend="gauge")`, as a transformers user would; `ManifoldCache(model, ...)` takes the model's dtype
and, for a cast model, the rounded rotary frequencies it really rotates with; every attention layer is rewritten
and runs the kernel (the run-time counters); and the generation equals the same model's eager run through
transformers' DynamicCache.  Then a document is spliced in at position 10^6 (a table edit: no key is moved or
re-rotated) and generation goes on, compiled.

    python examples/low_precision.py                          # SmolLM2-135M-Instruct in bfloat16
    python examples/low_precision.py --precision int8         # torchao int8 weight-only (pip install -e ".[quant]")
    python examples/low_precision.py --random llama --precision float16
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache

from gaugecompile.bench.decode_loops import greedy
from gaugecompile.bench.precision import variant
from gaugecompile.bench.prompts import QUESTION, chat_ids, decode
from gaugecompile.cache import ManifoldCache
from gaugecompile.models import add_model_arguments, model_from_args
from gaugecompile.ops.counters import runs

PRECISIONS = {"bfloat16": "bfloat16", "float16": None, "int8": "int8 weights",
              "int4": "int4 weights (intx, int8 storage)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--precision", choices=PRECISIONS, default="bfloat16", help="default bfloat16")
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens to generate (default 12)")
    args = parser.parse_args(argv)

    full, tokenizer = model_from_args(args)
    model = full.half() if args.precision == "float16" else variant(full, PRECISIONS[args.precision])
    print(f"model: {args.precision} (parameters {model.dtype}, rotary inv_freq "
          f"{next(b for n, b in model.named_buffers() if n.endswith('inv_freq')).dtype})")
    ids = chat_ids(tokenizer, model.config.vocab_size, QUESTION)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)

    reports: list = []
    model.compile(backend="gauge", options={"report_sink": reports})
    cache = ManifoldCache(model, max_batch_size=1, max_tokens=ids.shape[1] + 3 * args.new_tokens + 64)
    print(f"cache: {cache.kv_format.name} pools")
    runs.clear()
    with torch.no_grad():
        got = model.generate(ids, past_key_values=cache, **kwargs)
    rewritten = [len(r.rewritten) for r, _, _ in reports if r.rewritten or r.refused]
    refused = sum(len(r.refused) for r, _, _ in reports)
    print(f"gauge: {rewritten} attention site(s) rewritten per graph, {refused} refused; kernel calls "
          f"{runs['kernel']}, fallbacks {runs['masked_fallback']}")
    print("answer:", decode(tokenizer, got[0, ids.shape[1]:].tolist()))
    same = torch.equal(got, want)
    print(f"tokens equal to the eager DynamicCache run in {args.precision}: {same}")

    # a document spliced a million positions on, then more tokens: the keys stay as the model wrote them
    doc = chat_ids(tokenizer, model.config.vocab_size, "Paris is the capital of France.")[:, :16]
    chunk = cache.prefill(model, doc)
    cache.splice(cache.batch[0], chunk, 10**6)
    chunk.free()
    runs.clear()
    more, _ = greedy(model, got[:, -1:], cache, 4)  # by hand: the cache holds more than the ids generate() is given
    print(f"after a splice at 10^6: {decode(tokenizer, more)!r}, kernel calls {runs['kernel']}")

    ok = (same and rewritten and all(n == model.config.num_hidden_layers for n in rewritten) and not refused
          and runs["kernel"] > 0)
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
