"""Beam search with `model.generate(..., num_beams=4, past_key_values=ManifoldCache(...))`, eager and compiled.

Shows: the prompt is prefilled once and its blocks are shared by the 4 beams (forks, no copies); transformers'
beam reorder is an O(blocks) table edit (`reorder_cache`); the decode step compiled with `backend="gauge"`
and the eager ManifoldCache run give exactly the tokens of a DynamicCache run.

    python examples/beam_search.py                 # SmolLM2-135M-Instruct (fetched once)
    python examples/beam_search.py --random llama  # a tiny random model
    python examples/beam_search.py --random llama --inner eager --new-tokens 6
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from transformers import DynamicCache

from gaugecompile.bench.decode_loops import forward_replaced, gauge_forward, manifold_cache, prefilled
from gaugecompile.bench.prompts import QUESTION, chat_ids, decode
from gaugecompile.models import add_model_arguments, model_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--beams", type=int, default=4, help="number of beams (default 4)")
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens to generate (default 12)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="compiler behind the gauge passes (default inductor)")
    args = parser.parse_args(argv)

    model, tokenizer = model_from_args(args)
    ids = chat_ids(tokenizer, model.config.vocab_size, QUESTION)
    n, beams = args.new_tokens, args.beams
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
                  max_new_tokens=n, min_new_tokens=n, early_stopping=False, pad_token_id=0)
    cache = manifold_cache(model, batch=beams, max_tokens=beams * (ids.shape[1] + n + 16))
    reports: list = []  # the passes' report of every graph the compiled forward compiles
    compiled = gauge_forward(model, inner=args.inner, report_sink=reports)  # compiled once, reused by every step

    outputs = {}
    with torch.no_grad():
        for name, forward in (("ManifoldCache, eager", None), ("ManifoldCache, gauge", compiled)):
            cache.reset()
            # the prompt (all but its last token) runs once, eagerly; the beams fork it and share its blocks
            prefilled(model, cache, ids[:, :-1], beams)
            print(f"{name}: prompt of {ids.shape[1] - 1} tokens in {cache.blocks_in_use} blocks for {beams} beams")
            # with the compiled forward in place, generate() runs every decode step through the gauge backend
            with forward_replaced(model, forward) if forward else contextlib.nullcontext():
                outputs[name] = model.generate(**kwargs, past_key_values=cache)
        dynamic = prefilled(model, DynamicCache(config=model.config), ids[:, :-1], beams)
        outputs["DynamicCache, eager"] = model.generate(**kwargs, past_key_values=dynamic)

    rewritten = sum(len(report.rewritten) for report, _, _ in reports)
    print(f"gauge: {rewritten} attention site(s) rewritten to rotated_query_attention over {len(reports)} graph(s)")
    want = outputs["DynamicCache, eager"]
    ok = rewritten >= model.config.num_hidden_layers
    for name, out in outputs.items():
        same = torch.equal(out, want)
        ok &= same
        print(f"  best beam, {name:20}: {decode(tokenizer, out[0, ids.shape[1]:].tolist())}"
              f"{'' if same else '  <- DIFFERS from DynamicCache'}")
    if not ok:
        print("FAIL: tokens differ from the DynamicCache run, or a layer was not rewritten", file=sys.stderr)
        return 1
    print("OK: eager and compiled ManifoldCache beams equal DynamicCache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
