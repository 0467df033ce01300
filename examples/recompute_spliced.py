"""Selective recompute: splice stored documents into a prompt, then recompute a few of their tokens in context.

Shows: `cache.recompute(model, seq, [(at, doc_ids), ...], fraction=..., policy=...)` after `cache.splice`. A
spliced document never attended to the prompt before it, so the next-token distribution differs from a
re-prefill of the whole prompt; recomputing a fraction of each document's tokens ("first": EPIC,
"deviation": CacheBlend's selection) closes most of that gap, and recomputing all of them is the re-prefill.
The stored documents are untouched (their blocks are copied before a write), so the store serves the next
prompt as it was.
Run: `python examples/recompute_spliced.py` (SmolLM2-135M-Instruct, pydoc_data.topics) or `--random llama`.
"""

from __future__ import annotations

import argparse
import sys
from pydoc_data.topics import topics

import torch

from gaugecompile.cache import ManifoldCache
from gaugecompile.models import add_model_arguments, encode, model_from_args

DOCS, DOC_TOKENS = ("if", "while", "for"), 96


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted |log-prob difference| at 100%%")
    args = parser.parse_args(argv)
    model, tok = model_from_args(args)
    vocab = model.config.vocab_size
    prefix = encode(tok, vocab, "Three statements of Python, from its reference manual.\n\n", 16, seed=1)
    docs = [encode(tok, vocab, topics[name], DOC_TOKENS, seed=2 + i) for i, name in enumerate(DOCS)]
    question = encode(tok, vocab, "\n\nWhich of them repeats its body?", 12, seed=9)
    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=2048, block_size=16)
    store = [cache.prefill(model, doc) for doc in docs]  # each document once, alone
    with torch.no_grad():
        reference = model(input_ids=torch.cat([prefix, *docs, question], 1)).logits[0, -1].log_softmax(-1)

    def prompt(fraction: float, policy: str) -> torch.Tensor:
        """Log-probs of the next token after the spliced prompt with `fraction` of each document recomputed."""
        (seq,) = cache.new_sequences(1)
        cache.set_batch([seq])
        with torch.no_grad():
            model(input_ids=prefix, past_key_values=cache, use_cache=True)
        at, spans = prefix.shape[1], []
        for doc, chunk in zip(docs, store, strict=True):
            cache.splice(seq, chunk, at)  # an O(blocks) table edit
            spans.append((at, doc))
            at += doc.shape[1]
        redone = cache.recompute(model, seq, spans, fraction=fraction, policy=policy)
        with torch.no_grad():
            out = model(input_ids=question, past_key_values=cache, use_cache=True).logits[0, -1].log_softmax(-1)
        cache.free(seq)
        kl = float((reference.exp() * (reference - out)).sum())
        print(f"  {policy:<9} {fraction:>4.0%}: {len(redone):>3} tokens recomputed, KL(re-prefill || this) {kl:.2e}, "
              f"max |log-prob difference| {float((out - reference).abs().max()):.2e}")
        return out

    print(f"prompt: {prefix.shape[1]} + 3 x {DOC_TOKENS} + {question.shape[1]} tokens; the next token's distribution "
          "against a re-prefill of the whole prompt")
    for policy in ("first", "deviation"):
        for fraction in (0.0, 0.15, 0.5):
            prompt(fraction, policy)
    full = float((prompt(1.0, "first") - reference).abs().max())
    for chunk in store:
        chunk.free()
    if full > args.atol:
        print(f"FAIL: recomputing every token is {full:.1e} from the re-prefill (> {args.atol:.1e})", file=sys.stderr)
        return 1
    print(f"OK: recomputing every document token equals the re-prefill ({full:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
