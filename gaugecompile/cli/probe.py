"""`gaugecompile probe`: the attention-geometry probes of a model on a text, per layer, as a table, JSON and PNG.

    gaugecompile probe [--model PATH | --random ARCH] [--text TEXT | --tokens N] [--out DIR]

Key orthogonality (mean and largest |cos| between distinct keys), attention entropy (bits; mean over heads of
each head's mean over the tokens, and the spread), the value manifold (share of variance on the first principal
component, its correlation with the tokens' attention entropy).  See `gaugecompile.geometry`.
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


def _plot(layers, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [g.layer for g in layers]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [g.key_abs_cos_mean for g in layers], "o-", label="mean |cos|")
    axes[0].plot(x, [g.key_abs_cos_max for g in layers], "s--", label="max |cos|")
    axes[0].set(title="key orthogonality", xlabel="layer", ylabel="|cos| between distinct keys")
    axes[0].legend()
    for g in layers:
        axes[1].scatter([g.layer] * len(g.entropy_bits), g.entropy_bits, s=8, alpha=0.4, color="grey")
    mean = [sum(g.entropy_bits) / len(g.entropy_bits) for g in layers]
    spread = [sum(g.entropy_spread_bits) / len(g.entropy_spread_bits) for g in layers]
    axes[1].errorbar(x, mean, yerr=spread, fmt="o-", capsize=3, label="mean over heads (bar: spread)")
    axes[1].set(title="attention entropy", xlabel="layer", ylabel="bits")
    axes[1].legend()
    axes[2].plot(x, [g.value_pc_share[0] for g in layers], "o-", label="PC1 share of variance")
    axes[2].plot(x, [abs(g.value_pc1_entropy_corr) for g in layers], "s--", label="|corr(PC1, entropy)|")
    axes[2].set(title="value manifold", xlabel="layer", ylim=(0, 1))
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..cli.demo import text_ids
    from ..geometry import probe_geometry
    from ..models import model_from_args

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
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        (args.out / "probes.json").write_text(json.dumps({"model": name, "tokens": ids.shape[1],
                                                          "layers": [g.as_dict() for g in layers]}, indent=1))
        _plot(layers, args.out / "probes.png", f"{name}: {ids.shape[1]} tokens")
        print(f"wrote {args.out / 'probes.json'} and {args.out / 'probes.png'}", file=sys.stderr)
    return 0 if all(torch.isfinite(torch.tensor(g.key_abs_cos_mean)) for g in layers) else 1
