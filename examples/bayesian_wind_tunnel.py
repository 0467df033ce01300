"""A Bayesian wind tunnel: a small transformer trained on the CPU on bijection elimination, its predictive entropy
against the analytic posterior per position, and the three geometry probes on it.

Shows: `gaugecompile.research.wind_tunnel` end to end. Each sequence has its own random bijection of V symbols and shows
K pairs `x pi(x)`; the model predicts `pi(x_t)` at `x_t`, where the posterior is known in closed form (0 bits for
an input seen before, log2(V - k) bits for a new one, k = distinct inputs seen). A tiny LlamaForCausalLM (RoPE,
eager attention) trains for a wall-time budget on one thread, then over held-out sequences: the model's entropy
against the posterior's by position, the mean absolute error in bits, the KL from posterior to model, a plot;
then `probe_geometry` over one sequence (key |cos| in layer 0, attention entropy by layer, the value manifold)
and the value manifold against the posterior entropy (`wind_tunnel.value_manifold`). Checks: the numbers are
finite and, unless `--smoke`, the MAE is under `--max-mae`.
Run: `python examples/bayesian_wind_tunnel.py --out DIR` (10 minutes), `--smoke` (seconds: only that it runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from gaugecompile.research.geometry import probe_geometry
from gaugecompile.research.wind_tunnel import BijectionTask, build_model, evaluate, train, value_manifold

MINUTES = 9.5  # the default training budget: with evaluation and probes the run stays under 10 minutes


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plot(result, task: BijectionTask, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = list(range(1, task.pairs + 1))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    axes[0].plot(t, result.posterior_entropy_by_position, "k-", lw=2.5, alpha=0.5, label="analytic posterior")
    axes[0].plot(t, result.model_entropy_by_position, "o", ms=3.5, color="C0", label="model")
    axes[0].set(title="predictive entropy (mean over sequences)", xlabel="pair t", ylabel="bits")
    axes[0].legend()
    axes[1].semilogy(t, [max(x, 1e-6) for x in result.mae_by_position], "o-", ms=3.5, label="MAE |H_model - H_post|")
    axes[1].semilogy(t, [max(x, 1e-6) for x in result.kl_by_position], "s--", ms=3.5, label="KL(post || model)")
    axes[1].axhline(1e-3, color="grey", ls=":", label="1e-3 bits (papers)")
    axes[1].set(title=f"error per position (MAE {result.mae_bits:.2e} bits)", xlabel="pair t", ylabel="bits")
    axes[1].legend(fontsize=8)
    rows = result.by_posterior
    post = [r["posterior_bits"] for r in rows]
    axes[2].plot([0, math.log2(task.vocab)], [0, math.log2(task.vocab)], "k-", lw=1, alpha=0.5, label="y = x")
    axes[2].plot(post, [r["model_bits"] for r in rows], "o", color="C1", label="model, mean per posterior value")
    axes[2].set(title="model vs posterior entropy", xlabel="posterior bits", ylabel="model bits")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=16, help="V symbols (default 16)")
    parser.add_argument("--pairs", type=int, default=32, help="K pairs per sequence (default 32)")
    parser.add_argument("--repeat", type=float, default=0.5,
                        help="probability that an input repeats a seen one (default 0.5; 0: permutation prefix; "
                             "-1: uniform with replacement)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--minutes", type=float, help=f"training wall-time budget (default {MINUTES} unless --steps)")
    parser.add_argument("--steps", type=int, help="train this many steps (with --minutes: whichever comes first)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--final-lr", type=float, default=0.01, help="final learning rate as a share of --lr")
    parser.add_argument("--eval", type=int, default=2000, help="held-out sequences (default 2000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-mae", type=float, default=0.02, help="check: MAE under this many bits (default 0.02)")
    parser.add_argument("--smoke", action="store_true", help="30 steps, 200 held-out sequences, no MAE check")
    parser.add_argument("--out", type=Path, help="write wind_tunnel.json, wind_tunnel.png and probes.png there")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.eval, args.max_mae = args.steps or 30, min(args.eval, 200), None
    if args.steps is None and args.minutes is None:
        args.minutes = MINUTES
    torch.set_num_threads(args.threads)
    task = BijectionTask(args.vocab, args.pairs, None if args.repeat < 0 else args.repeat)
    model = build_model(task, hidden=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    budget = ([f"{args.steps} steps"] if args.steps else []) + ([f"{args.minutes} min"] if args.minutes else [])
    print(f"task: V={task.vocab}, K={task.pairs}, repeat={task.repeat}; model: LlamaForCausalLM {args.layers} layers, "
          f"hidden {args.hidden}, {args.heads} heads, {params:,} parameters; budget {' / '.join(budget)} on "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    log = train(model, task, steps=args.steps, seconds=args.minutes * 60 if args.minutes else None,
                batch=args.batch, lr=args.lr, final_lr=args.final_lr, seed=args.seed,
                log_every=10 if args.smoke else 250, log=lambda line: print(line, flush=True))
    print(f"trained {log.steps} steps in {log.seconds:.1f} s", flush=True)

    start = time.perf_counter()
    result = evaluate(model, task, sequences=args.eval)
    print(f"evaluated {args.eval} held-out sequences in {time.perf_counter() - start:.1f} s")
    print(f"{'pair':>4} {'posterior bits':>14} {'model bits':>10} {'MAE bits':>9} {'KL bits':>9}")
    for t, (hp, hm, e, kl) in enumerate(zip(result.posterior_entropy_by_position, result.model_entropy_by_position,
                                            result.mae_by_position, result.kl_by_position, strict=True), 1):
        print(f"{t:>4} {hp:>14.4f} {hm:>10.4f} {e:>9.2e} {kl:>9.2e}")
    print(f"{'posterior bits':>14} {'count':>6} {'model bits':>10} {'MAE bits':>9}")
    for row in result.by_posterior:
        print(f"{row['posterior_bits']:>14.4f} {row['count']:>6} {row['model_bits']:>10.4f} {row['mae_bits']:>9.2e}")
    print(f"MAE {result.mae_bits:.2e} bits (repeated inputs {result.mae_repeat_bits:.2e}, new inputs "
          f"{result.mae_new_bits:.2e}, largest {result.max_abs_error_bits:.2e}); KL(post || model) "
          f"{result.kl_bits:.2e} bits; cross-entropy {result.cross_entropy_bits:.4f} bits against the Bayes floor "
          f"{result.bayes_cross_entropy_bits:.4f}")

    sequence = task.sample(1, torch.Generator().manual_seed(3_000_017)).ids
    layers = probe_geometry(model, sequence)
    manifold = value_manifold(model, task, sequences=32 if args.smoke else 256)
    print(f"probes over one held-out sequence ({sequence.shape[1]} tokens), and the values at the query positions "
          f"of {32 if args.smoke else 256} sequences against the posterior entropy")
    print(f"{'layer':>5} {'key |cos| mean':>14} {'max':>6} {'attn entropy bits':>17} {'PC1 share':>9} "
          f"{'corr(PC1, attn H)':>17} {'PC1-3 share':>17} {'corr(PC1-3, posterior H)':>24}")
    for g, m in zip(layers, manifold, strict=True):
        share = " ".join(f"{x:.2f}" for x in m["pc_share"])
        corr = " ".join(f"{x:+.2f}" for x in m["pc_entropy_corr"])
        print(f"{g.layer:>5} {g.key_abs_cos_mean:>14.3f} {g.key_abs_cos_max:>6.3f} "
              f"{sum(g.entropy_bits) / len(g.entropy_bits):>17.3f} {g.value_pc_share[0]:>9.3f} "
              f"{g.value_pc1_entropy_corr:>17.3f} {share:>17} {corr:>24}")

    record = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                    "python": platform.python_version()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "parameters": params},
        "train": log.as_dict(), "result": result.as_dict(),
        "probes": [g.as_dict() for g in layers], "value_manifold": manifold,
    }
    if args.out:
        from gaugecompile.research.geometry_plot import plot_geometry

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "wind_tunnel.json").write_text(json.dumps(record, indent=1))
        title = (f"bijection wind tunnel V={task.vocab}, K={task.pairs}: {args.layers}-layer Llama, hidden "
                 f"{args.hidden}, {log.steps} steps in {log.seconds / 60:.1f} min on {torch.get_num_threads()} thread")
        _plot(result, task, args.out / "wind_tunnel.png", title)
        plot_geometry(layers, args.out / "probes.png", f"probes of the trained model over one sequence "
                                                       f"({sequence.shape[1]} tokens)")
        print(f"wrote {args.out / 'wind_tunnel.json'}, {args.out / 'wind_tunnel.png'}, {args.out / 'probes.png'}")

    numbers = [result.mae_bits, result.kl_bits, result.cross_entropy_bits, *result.model_entropy_by_position,
               *(g.key_abs_cos_mean for g in layers), *(x for g in layers for x in g.entropy_bits)]
    if not all(math.isfinite(x) for x in numbers):
        print("FAIL: a result is not finite", file=sys.stderr)
        return 1
    if args.max_mae is not None and not result.mae_bits < args.max_mae:
        print(f"FAIL: MAE {result.mae_bits:.2e} bits is not under {args.max_mae} bits", file=sys.stderr)
        return 1
    check = "finite results (smoke run: no MAE check)" if args.max_mae is None else \
        f"MAE {result.mae_bits:.2e} bits under {args.max_mae} bits"
    print(f"OK: {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
