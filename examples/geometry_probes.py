"""Attention-geometry probes, and the gauge check: an edit of the cache leaves the geometry as it was.

Shows: `gaugecompile.research.geometry.probe_geometry(model, ids, cache)` per layer (key orthogonality, attention
entropy, the value manifold), on a continuation read over a ManifoldCache after `delete`, against the same
probes over the re-rotating reference (a DynamicCache of the prompt with the span cut and the later keys
re-rotated back). The probes must agree: what an edit changes is where data sits, not the geometry.
`gaugecompile probe` gives the probes of a text on its own, with plots.
Run: `python examples/geometry_probes.py` (SmolLM2-135M-Instruct) or `--random llama`.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache

from gaugecompile.bench.baselines import cut_and_rerotate, rope_of_model
from gaugecompile.bench.decode_loops import manifold_cache
from gaugecompile.bench.prompts import text_ids
from gaugecompile.models import add_model_arguments, model_from_args
from gaugecompile.research.geometry import probe_geometry

TOLERANCE = 1e-4  # float32 model: the two caches' keys differ by rounding of one rotation


def _largest_difference(a, b) -> tuple[str, float]:
    worst = ("", 0.0)
    for x, y in zip(a, b, strict=True):
        for name, value in x.as_dict().items():
            other = y.as_dict()[name]
            pairs = zip(value, other, strict=True) if isinstance(value, list) else [(value, other)]
            for p, q in pairs:
                if p == p and q == q and abs(p - q) > worst[1]:  # nan (too few tokens) on both sides is equal
                    worst = (f"layer {x.layer} {name}", abs(p - q))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=160, help="prompt tokens (default 160)")
    args = parser.parse_args(argv)
    model, tok = model_from_args(args)
    ids = text_ids(tok, model.config.vocab_size, args.tokens + 32)
    prompt, continuation = ids[:, :args.tokens], ids[:, args.tokens:]
    start, end = args.tokens // 4, args.tokens // 2 + 3  # off the block boundaries
    cache = manifold_cache(model, max_tokens=args.tokens + 64)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        model(input_ids=prompt, past_key_values=full, use_cache=True)
    cache.delete(0, start, end)
    reference = cut_and_rerotate(full, start, end, rope_of_model(model), model.config)
    got = probe_geometry(model, continuation, cache)
    want = probe_geometry(model, continuation, reference)
    print(f"deleted [{start}, {end}) of {args.tokens} tokens; probes of the {continuation.shape[1]}-token "
          "continuation, ManifoldCache | re-rotated reference")
    print(f"{'layer':>5} {'key |cos|':>19} {'entropy bits':>17} {'PC1 share':>15}")
    for a, b in zip(got, want, strict=True):
        ea, eb = (sum(g.entropy_bits) / len(g.entropy_bits) for g in (a, b))
        print(f"{a.layer:>5} {a.key_abs_cos_mean:>9.4f} {b.key_abs_cos_mean:>9.4f} {ea:>8.4f} {eb:>8.4f} "
              f"{a.value_pc_share[0]:>7.4f} {b.value_pc_share[0]:>7.4f}")
    where, diff = _largest_difference(got, want)
    print(f"largest difference: {diff:.2e} ({where})")
    if diff > TOLERANCE:
        print(f"FAIL: the edit changed the geometry by more than {TOLERANCE}", file=sys.stderr)
        return 1
    print("OK: the probes over the edited ManifoldCache equal those over the re-rotated reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
