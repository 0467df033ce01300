"""Learnt positions: the gaps between three spliced documents, learnt by gradient descent on an answer's NLL.

Shows: documents prefilled once into a ManifoldCache (`cache.prefill`) are placed with real-valued gaps
(`gaugecompile.research.placement.ChunkPlacement`); the NLL of a reference answer after a question is differentiable in
the gaps (the keys are re-rotated by real deltas with an exact gradient), so `learn_gaps` runs Adam on them.
Beside it, in the same run, Position Engineering's grid search (He et al., 2024) over the same gaps: loss reached
and forward passes spent.  The store is never written: every placement reads the same blocks.
Run: `python examples/learn_positions.py` (SmolLM2-135M-Instruct, documents from pydoc_data.topics) or
`--random llama`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from pydoc_data.topics import topics

import torch

from gaugecompile.bench.decode_loops import manifold_cache
from gaugecompile.models import add_model_arguments, encode, model_from_args
from gaugecompile.research.placement import ChunkPlacement, grid_search, learn_gaps

DOC_TOKENS, DOCS = 96, ("lambda", "pass", "break")
QUESTION = "\n\nQuestion: What does the pass statement do?\nAnswer:"
ANSWER = " It is a null operation; when it is executed, nothing happens."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=40, help="gradient steps (default 40)")
    parser.add_argument("--lr", type=float, default=8.0, help="Adam step in positions (default 8)")
    parser.add_argument("--grid", type=float, nargs="+", default=[0, 8, 32, 128, 512],
                        help="gap values of the grid search, per gap (default 0 8 32 128 512)")
    parser.add_argument("--init", type=float, default=16.0, help="every gap where gradient descent starts (default 16)")
    parser.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    args = parser.parse_args(argv)
    model, tok = model_from_args(args)
    vocab = model.config.vocab_size
    cache = manifold_cache(model, max_tokens=len(DOCS) * DOC_TOKENS + 64)
    store = [cache.prefill(model, encode(tok, vocab, topics[name], DOC_TOKENS, seed)) for seed, name in
             enumerate(DOCS)]
    query = encode(tok, vocab, QUESTION, 16, seed=20)
    answer = encode(tok, vocab, ANSWER, 14, seed=21)
    if tok is not None:  # the answer as the tokenizer splits it, not padded
        answer = torch.tensor([tok(ANSWER).input_ids])
    placement = ChunkPlacement(cache, store)
    with torch.no_grad():
        plain = float(placement.nll(model, query, answer))
    print(f"{len(DOCS)} documents ({', '.join(DOCS)}), {placement.num_tokens} tokens; answer {answer.shape[1]} tokens; "
          f"NLL with no gaps {plain:.4f} nats/token")
    grid = grid_search(placement, model, query, answer, args.grid)
    print(f"grid search: {grid.forwards} forwards, best gaps {grid.gaps}, NLL {grid.loss:.4f}")
    placement = ChunkPlacement(cache, store, [args.init] * len(DOCS))

    def progress(step: int, loss: float, gaps: list[float]) -> None:
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step:3d}  NLL {loss:.4f}  gaps {[round(g, 2) for g in gaps]}")

    learnt = learn_gaps(placement, model, query, answer, steps=args.steps, lr=args.lr, progress=progress)
    print(f"\n| method | gaps | NLL (nats/token) | forwards | backwards | seconds |\n|---|---|---|---|---|---|\n"
          f"| no gaps | [0, 0, 0] | {plain:.4f} | 1 | 0 | - |")
    for run in (grid, learnt):
        print(f"| {run.method} | {[round(g, 1) for g in run.gaps]} | {run.loss:.4f} | {run.forwards} | "
              f"{run.backwards} | {run.seconds:.1f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "learn_positions.json").write_text(json.dumps(
            {"no_gaps": plain, "runs": [grid.as_dict(), learnt.as_dict()]}, indent=2))
    if not learnt.loss < learnt.losses[0] or not all(torch.isfinite(torch.tensor(learnt.losses))):
        print(f"FAIL: gradient descent did not lower the NLL from its start ({learnt.losses[0]:.4f}, best "
              f"{learnt.loss:.4f})", file=sys.stderr)
        return 1
    print(f"OK: learnt gaps reach NLL {learnt.loss:.4f} (no gaps {plain:.4f}, grid {grid.loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
