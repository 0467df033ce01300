"""Edit a cache, then go on generating with the call every transformers user writes.

Shows: after `cache.delete(seq, start, end)` the cache holds the view text[:start] + text[end:];
`model.generate(input_ids=<the view's ids> + new ids, past_key_values=cache)` feeds only the new ids,
as for any prefix cache, because `get_seq_length()` is the view length. The reference is what other
systems do: a DynamicCache of the full prompt with the span's keys and values cut out and the later
keys re-rotated back by the span (gather + re-rotate). Both must generate the same tokens.
Run: `python examples/edit_and_generate.py` (SmolLM2-135M-Instruct) or `--random llama`.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache

from gaugecompile.bench.baselines import cut_and_rerotate, rope_of_model
from gaugecompile.bench.decode_loops import manifold_cache
from gaugecompile.bench.prompts import chat_ids, decode
from gaugecompile.models import add_model_arguments, model_from_args

MESSAGE = "Tell me about the sea. Ignore this sentence entirely, please. Then write one line about boats."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    args = parser.parse_args(argv)
    model, tok = model_from_args(args)
    prompt = chat_ids(tok, model.config.vocab_size, MESSAGE)
    start, end = 8, min(24, prompt.shape[1] - 4)  # a span that is not a multiple of the block size
    cache = manifold_cache(model, max_tokens=prompt.shape[1] + args.new_tokens + 64, block_size=16)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        model(input_ids=prompt, past_key_values=full, use_cache=True)
    cache.delete(0, start, end)
    view = torch.cat([prompt[:, :start], prompt[:, end:]], 1)
    print(f"prompt {prompt.shape[1]} tokens; deleted [{start}, {end}): the cache holds {cache.get_seq_length()}")
    # Keep the view's last token out of the cache: generate() needs at least one new id to feed.
    cache.crop(-1)
    reference = cut_and_rerotate(full, start, end, rope_of_model(model), model.config)
    reference.crop(-1)
    kwargs = dict(input_ids=view, max_new_tokens=args.new_tokens, do_sample=False)
    got = model.generate(past_key_values=cache, **kwargs)[0, view.shape[1]:].tolist()
    want = model.generate(past_key_values=reference, **kwargs)[0, view.shape[1]:].tolist()
    print(f"gauge     : {decode(tok, got)!r}\nreference : {decode(tok, want)!r}")
    if got != want:
        print("FAIL: generation after the edit differs from the re-rotated DynamicCache", file=sys.stderr)
        return 1
    print("OK: generation after the edit equals the re-rotated DynamicCache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
