"""`gaugecompile probe`: the attention-geometry probes of a model on a text, per layer, as a table, JSON and PNG.

    gaugecompile probe [--model PATH | --random ARCH] [--text TEXT | --tokens N] [--out DIR]

Key orthogonality (mean and largest |cos| between distinct keys), attention entropy (bits; mean over heads of
each head's mean over the tokens, and the spread), the value manifold (share of variance on the first principal
component, its correlation with the tokens' attention entropy).  See `gaugecompile.research.geometry`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--text", help="the text to probe (default: the first tokens of pydoc_data.topics)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the default text (default 256)")
    parser.add_argument("--out", type=Path, help="write probes.json and probes.png there")


def run(args: argparse.Namespace) -> int:
    from ..bench.prompts import text_ids
    from ..models import model_from_args
    from ..research.geometry import probe_geometry
    from ..research.geometry_plot import plot_geometry

    model, tokenizer = model_from_args(args)
    if args.text is not None:
        if tokenizer is None:
            print("--text needs a model with a tokenizer (a --random model has none)", file=sys.stderr)
            return 2
        ids = tokenizer(args.text, return_tensors="pt").input_ids
    else:
        ids = text_ids(tokenizer, model.config.vocab_size, args.tokens)
    print(f"probing {type(model).__name__} ({model.config.num_hidden_layers} layers) on {ids.shape[1]} tokens",
          file=sys.stderr)
    layers = probe_geometry(model, ids)
    print(f"{'layer':>5} {'key |cos| mean':>15} {'max':>7} {'entropy bits':>13} {'spread':>7} {'PC1 share':>10} "
          f"{'corr(PC1,H)':>12}")
    for g in layers:
        print(f"{g.layer:>5} {g.key_abs_cos_mean:>15.3f} {g.key_abs_cos_max:>7.3f} "
              f"{sum(g.entropy_bits) / len(g.entropy_bits):>13.3f} "
              f"{sum(g.entropy_spread_bits) / len(g.entropy_spread_bits):>7.3f} {g.value_pc_share[0]:>10.3f} "
              f"{g.value_pc1_entropy_corr:>12.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = model.config.name_or_path or type(model).__name__
        (args.out / "probes.json").write_text(json.dumps({"model": name, "tokens": ids.shape[1],
                                                          "layers": [g.as_dict() for g in layers]}, indent=1))
        plot_geometry(layers, args.out / "probes.png", f"{name}: {ids.shape[1]} tokens")
        print(f"wrote {args.out / 'probes.json'} and {args.out / 'probes.png'}", file=sys.stderr)
    return 0 if all(torch.isfinite(torch.tensor(g.key_abs_cos_mean)) for g in layers) else 1
