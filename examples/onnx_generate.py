"""Generate with onnxruntime: an exported decode step driven by transformers' generate() over a ManifoldCache.

Shows: `OrtCausalLM.from_model(model, path)` exports the step (`export_onnx` of the model called over a
ManifoldCache: pools, tables, deltas, token counts and write slots as inputs) and loads it; its `generate()`
is transformers' own (greedy, beam search here), the cache's bookkeeping stays on the host, and the cache's
edits between calls (a delete, a streaming window) work as with the torch model. Every output is compared with
the torch model over a twin cache.
Run: `python examples/onnx_generate.py` (SmolLM2-135M-Instruct) or `--random llama`; `--fused` runs the `ai.gauge`
nodes with the native kernel (onnxruntime-extensions) instead of their function in standard ops.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from gaugecompile.cache import ManifoldCache
from gaugecompile.models import add_model_arguments, encode, model_from_args
from gaugecompile.onnx import OrtCausalLM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens per generate() call (default 12)")
    parser.add_argument("--window", type=int, default=32, help="streaming window in tokens (default 32)")
    parser.add_argument("--fused", action="store_true",
                        help="run the ai.gauge nodes with the native kernel (needs onnxruntime-extensions)")
    parser.add_argument("--out", type=Path, help="keep the exported file here (default: a temporary directory)")
    args = parser.parse_args(argv)
    model, tok = model_from_args(args)
    prompt = encode(tok, model.config.vocab_size, "The while statement is used for repeated execution", 16, seed=1)

    def caches():
        return [ManifoldCache(model.config, max_batch_size=4, max_tokens=1024, block_size=16) for _ in range(2)]

    with tempfile.TemporaryDirectory() as tmp:
        ort_lm = OrtCausalLM.from_model(model, args.out or Path(tmp) / "step.onnx", fused=args.fused)
        ok = True
        for name, mode in (("greedy", dict(do_sample=False)), ("4 beams", dict(num_beams=4, do_sample=False))):
            outs = [lm.generate(input_ids=prompt, past_key_values=cache, max_new_tokens=args.new_tokens, **mode)
                    for lm, cache in zip((ort_lm, model), caches(), strict=True)]
            same = outs[0].tolist() == outs[1].tolist()
            ok &= same
            text = tok.decode(outs[0][0, prompt.shape[1]:]) if tok is not None else outs[0][0].tolist()
            print(f"{name:<8} onnxruntime: {text!r}  (torch model: {'same' if same else 'DIFFERENT'})")
        outs = []
        for lm, cache in zip((ort_lm, model), caches(), strict=True):  # generate, delete a span, generate on
            first = lm.generate(input_ids=prompt, past_key_values=cache, max_new_tokens=args.new_tokens,
                                do_sample=False)
            view = first[0, :-1].tolist()
            cache.delete(0, 2, 10)
            ids = torch.tensor([view[:2] + view[10:] + first[0, -1:].tolist()])
            outs.append(lm.generate(input_ids=ids, past_key_values=cache, max_new_tokens=args.new_tokens,
                                    do_sample=False))
        same = outs[0].tolist() == outs[1].tolist()
        ok &= same
        print(f"after delete(0, 2, 10), generation goes on: torch model {'same' if same else 'DIFFERENT'}")
        streams = []
        for lm, cache in zip((ort_lm, model), caches(), strict=True):  # a sink window over 2.5 windows of steps
            cache.set_window(4, args.window)
            tokens, ids = [], prompt
            with torch.no_grad():
                for _ in range(5 * args.window // 2):
                    ids = lm(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    tokens.append(int(ids))
            streams.append(tokens)
        same = streams[0] == streams[1]
        ok &= same
        print(f"streaming, 4 sinks + {args.window}-token window, {len(streams[0])} steps: torch model "
              f"{'same' if same else 'DIFFERENT'}")
    if not ok:
        print("FAIL: onnxruntime and the torch model generated different tokens", file=sys.stderr)
        return 1
    print("OK: onnxruntime generates what the torch model generates over a ManifoldCache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
