"""Document reuse: prefill a store of documents once, splice them into new prompts at new positions.

Shows: `cache.prefill(model, ids)` runs a document once and returns a `KVChunk`; `cache.splice(seq, chunk, at=...)`
places it anywhere in a prompt as a table edit (no key is copied or re-rotated). The answer, decoded with the
gauge-compiled step, equals a DynamicCache whose document keys were re-rotated to the same positions (what other
systems do). It is not a re-prefill: a spliced document did not attend to the new prefix.
Run: `python examples/document_reuse.py` (SmolLM2-135M-Instruct, documents from pydoc_data.topics) or `--random llama`.
"""

from __future__ import annotations

import argparse
import sys
from pydoc_data.topics import topics

import torch
from transformers import DynamicCache

from gaugecompile.bench.baselines import append_rerotated, rope_of_model
from gaugecompile.bench.decode_loops import gauge_forward, greedy, manifold_cache, prefilled
from gaugecompile.bench.prompts import decode
from gaugecompile.models import add_model_arguments, encode, model_from_args

BLOCK, DOC_TOKENS, DOCS = 16, 96, ("pass", "break", "lambda")  # documents: whole blocks, so splices stay aligned
PREFIX = "You are a careful assistant. Answer from the reference text below.\n\n"
PROMPTS = (("What does the pass statement do?", ("pass",)), ("Where may break occur?", ("lambda", "break")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=10, help="answer tokens (default 10)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor", help="default inductor")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted |logit difference|")
    args = parser.parse_args(argv)
    model, tok = model_from_args(args)
    vocab, rope = model.config.vocab_size, rope_of_model(model)
    cache = manifold_cache(model, max_tokens=8 * DOC_TOKENS + 256, block_size=BLOCK)
    docs = {name: encode(tok, vocab, topics[name], DOC_TOKENS, seed) for seed, name in enumerate(DOCS)}
    store = {name: cache.prefill(model, ids) for name, ids in docs.items()}  # each document runs once, eagerly
    reference_docs = {name: prefilled(model, DynamicCache(config=model.config), ids) for name, ids in docs.items()}
    print(f"store: {', '.join(f'{k} ({c.span} tokens)' for k, c in store.items())} in {cache.blocks_in_use} blocks")
    prefix = encode(tok, vocab, PREFIX, 64, seed=7)  # padded with newlines to whole blocks (aligned splices)
    pad = torch.full((1, -prefix.shape[1] % BLOCK), tok("\n").input_ids[-1] if tok is not None else 0)
    prefix, forward, worst = torch.cat([prefix, pad], dim=1), gauge_forward(model, inner=args.inner), 0.0
    for index, (text, names) in enumerate(PROMPTS):
        question = encode(tok, vocab, f"\n\nQuestion: {text}\nAnswer:", 16, seed=20 + index)
        cache.reset()  # frees the previous prompt; the store's chunks keep their blocks
        prefilled(model, cache, prefix)
        reference = prefilled(model, DynamicCache(config=model.config), prefix)
        at = [prefix.shape[1]]
        for name in names:
            cache.splice(cache.batch[0], store[name], at=at[-1])  # O(blocks) table edit
            append_rerotated(reference, reference_docs[name], at[-1], rope)  # O(tokens * head_dim) re-rotation
            at.append(at[-1] + store[name].span)
        with torch.no_grad():
            logits = model(input_ids=question, past_key_values=cache, use_cache=True).logits[:, -1:]
            ref_logits = model(input_ids=question, past_key_values=reference, use_cache=True).logits[:, -1:]
        worst = max(worst, (logits - ref_logits).abs().max().item())
        answer = [int(logits.argmax())] + greedy(forward, logits.argmax(-1), cache, args.new_tokens - 1)[0]
        ref_answer = [int(ref_logits.argmax())] + greedy(model.forward, ref_logits.argmax(-1), reference,
                                                         args.new_tokens - 1)[0]
        print(f"Q: {text} ({', '.join(f'{n} at {a}' for n, a in zip(names, at, strict=False))})\n"
              f"  spliced (gauge): {decode(tok, answer)}\n  re-rotated     : {decode(tok, ref_answer)}")
        if answer != ref_answer or worst > args.atol:
            print(f"FAIL: answers differ or max |logit difference| {worst:.1e} > {args.atol:.1e}", file=sys.stderr)
            return 1
    print(f"OK: spliced answers equal the re-rotated reference (max |logit difference| {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
