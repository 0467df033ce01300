"""A hybrid model (linear attention, SSM or convolution layers beside attention) over ManifoldCache.

Shows: which layers the cache pools (attention) and which keep conv/recurrent states (per sequence, beside the
pools); greedy and beam search give DynamicCache's tokens; a prompt forked into two continuations shares its
blocks and its states (aliased rows, no copy); an edit of the token sequence (`delete`) is refused with the
reason before any change; the decode step compiled with `backend="gauge"` runs the rotated-query op in every
attention layer and equals eager.

    python examples/hybrid_model.py                          # a tiny random Qwen3-Next (gated delta rule)
    python examples/hybrid_model.py --model PATH             # a hybrid checkpoint (Qwen3.5, Falcon-H1, ...)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

import torch
from transformers import DynamicCache

from gaugecompile.bench.decode_loops import forward_replaced, gauge_forward, manifold_cache
from gaugecompile.models import add_model_arguments, model_from_args

# transformers' reference kernels for the linear layers warn once each that the fused ones are not installed
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="eager",
                        help="compiler behind the gauge passes (default eager)")
    args = parser.parse_args(argv)
    if not args.model:
        args.random = args.random or "qwen3_next"
    model, _ = model_from_args(args)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(3, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    cache = manifold_cache(model, batch=4, max_tokens=4 * (ids.shape[1] + n + 16), block_size=4)
    if cache.states is None:
        print(f"{model.config.model_type}: every layer attends; nothing hybrid to show", file=sys.stderr)
        return 2
    kinds = cache.shape.kinds
    print(f"{model.config.model_type}: attention layers {list(cache.attention_layers)} in the block pools, "
          f"state layers {list(cache.states.layers)} ({', '.join(sorted(set(kinds)))}) kept per sequence")

    ok = True
    for name, extra in (("greedy", {}), ("4 beams", {"num_beams": 4})):
        kwargs = dict(input_ids=ids, max_new_tokens=n, do_sample=False, **extra)
        ours = model.generate(past_key_values=manifold_cache(model, batch=4, max_tokens=256, block_size=4), **kwargs)
        want = model.generate(past_key_values=DynamicCache(config=model.config), **kwargs)
        same = torch.equal(ours, want)
        ok &= same
        print(f"  {name:8}: {ours[0, ids.shape[1]:].tolist()} {'= DynamicCache' if same else '<- DIFFERS'}")

    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        (seq,) = cache.batch
        cache.fork(seq, 1)  # blocks shared, state rows aliased
        print(f"  fork: sequences {cache.batch} share {cache.blocks_in_use} blocks and one state row each layer "
              f"(rows {[cache.states.row_of[s] for s in cache.batch]})")
        model(input_ids=torch.tensor([[5], [7]]), past_key_values=cache, use_cache=True)
        print(f"  after one step each: state rows {[cache.states.row_of[s] for s in cache.batch]} (now their own)")
    before = (cache.mapping(seq), cache.positions(seq))
    try:
        cache.delete(seq, 2, 5)
    except ValueError as exc:
        unchanged = (cache.mapping(seq), cache.positions(seq)) == before
        ok &= unchanged
        print(f"  delete refused{' (cache unchanged)' if unchanged else ' BUT THE CACHE CHANGED'}: {exc}")
    else:
        print("  delete was not refused", file=sys.stderr)
        ok = False

    reports: list = []
    compiled = gauge_forward(model, inner=args.inner, report_sink=reports)
    steps = {}
    for name, forward in (("eager", None), ("gauge", compiled)):
        run = manifold_cache(model, batch=1, max_tokens=256, block_size=4)
        run.new_sequences(1)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=run, use_cache=True)
            with forward_replaced(model, forward) if forward else contextlib.nullcontext():
                steps[name] = model(input_ids=torch.tensor([[9]]), past_key_values=run, use_cache=True).logits
    rewritten = sum(len(r.rewritten) for r, _, _ in reports)
    same = torch.allclose(steps["gauge"], steps["eager"], atol=1e-4, rtol=1e-4)
    ok &= same and rewritten >= len(cache.attention_layers)
    print(f"  compiled decode step: {rewritten} attention site(s) rewritten for {len(cache.attention_layers)} "
          f"attention layer(s), {'equal to' if same else 'DIFFERENT from'} eager")
    if not ok:
        print("FAIL: see above", file=sys.stderr)
        return 1
    print("OK: hybrid model over ManifoldCache equals transformers' own cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
