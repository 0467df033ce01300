"""StreamingLLM over a long English text: attention sinks + a recent window with `cache.set_window(sink, window)`.

Shows: decoding far past the window with ManifoldCache, where each eviction is an O(blocks) table edit and kept
keys are never re-rotated (the compiled step rotates the query per block instead), gives the logits of the
re-rotating baseline `gaugecompile.bench.baselines.RerotatingSinkCache`, which re-rotates every kept key on every
eviction. The text is `pydoc_data.topics` (ships with Python); the decode step is compiled with backend="gauge".

    python examples/streaming.py                 # SmolLM2-135M-Instruct, 4 sinks + 256 window, 128 steps past it
    python examples/streaming.py --random llama  # a tiny random model (random token ids)
    python examples/streaming.py --random llama --window 16 --steps 32 --block-size 4 --inner eager
"""

from __future__ import annotations

import argparse
import sys

from gaugecompile.bench.decode_loops import gauge_forward, stream_baseline, stream_gauge
from gaugecompile.bench.prompts import decode, text_ids
from gaugecompile.models import add_model_arguments, model_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--sink", type=int, default=4, help="attention-sink tokens kept at the start (default 4)")
    parser.add_argument("--window", type=int, default=256, help="recent tokens kept (default 256)")
    parser.add_argument("--steps", type=int, default=128, help="tokens streamed past sinks + window (default 128)")
    parser.add_argument("--block-size", type=int, default=16, help="ManifoldCache block size (default 16)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="compiler behind the gauge passes (default inductor)")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted |logit difference|")
    args = parser.parse_args(argv)

    model, tokenizer = model_from_args(args)
    ids = text_ids(tokenizer, model.config.vocab_size, args.sink + args.window + args.steps)
    print(f"streaming {ids.shape[1]} tokens with {args.sink} sinks + a {args.window}-token window; text begins "
          f"{decode(tokenizer, ids[0, :16].tolist())}")

    # ManifoldCache: the first sink + window - 1 tokens are prefilled eagerly, then one compiled step per token,
    # each followed by set_window(sink, window - 1) (a table edit; no key is moved or re-rotated)
    forward = gauge_forward(model, inner=args.inner)
    logits, _, held = stream_gauge(forward, model, ids, sink=args.sink, window=args.window,
                                   block_size=args.block_size)
    # the baseline evicts exactly the tokens ManifoldCache evicted (whole blocks), re-rotating the kept keys
    base_logits, _ = stream_baseline(model, ids, sink=args.sink, window=args.window, lengths=held,
                                     block_size=args.block_size)

    print(f"after {ids.shape[1]} tokens the cache holds {held[-1]} (sink blocks + window, block size "
          f"{args.block_size}); most it held: {max(held)}")
    diff = (logits - base_logits).abs().max().item()
    agree = (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
    accuracy = (logits[:-1].argmax(-1) == ids[0, args.sink + args.window - 1:]).float().mean().item()  # vs the text
    print(f"next-token accuracy on the text past the prefill: {accuracy:.1%}")
    print(f"vs re-rotating sink cache over {logits.shape[0]} predictions: max |logit difference| {diff:.1e}, "
          f"argmax equal {agree:.1%}")
    if max(held) >= ids.shape[1]:
        print("FAIL: nothing was evicted; stream more --steps past the window", file=sys.stderr)
        return 1
    if diff > args.atol:
        print(f"FAIL: logits differ by {diff:.1e} > {args.atol:.1e}", file=sys.stderr)
        return 1
    print("OK: sinks + window over ManifoldCache equal the re-rotating baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
