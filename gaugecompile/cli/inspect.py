"""`gaugecompile inspect`: show which attention sites the gauge passes rewrite or refuse in a model."""

from __future__ import annotations

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="a transformers model_type built from a small random config (e.g. llama)")
    src.add_argument("--model", help="path of a local transformers checkpoint")
    parser.add_argument("--tokens", type=int, default=6, help="prompt length of the prefill (default 6)")
    parser.add_argument("--markdown", action="store_true", help="print the report as markdown")
    parser.add_argument("--graphs", action="store_true", help="also print the graphs after the passes")


def _load(args: argparse.Namespace):
    if args.model:
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
    from ..models.random_configs import random_model

    return random_model(args.arch)


def run(args: argparse.Namespace) -> int:
    """Prefill, then explain one decode step through the model's own DynamicCache."""
    import transformers

    from ..explain import explain

    model = _load(args)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    with torch.no_grad():
        past = model(ids, past_key_values=transformers.DynamicCache(config=model.config), use_cache=True)
    report = explain(model, ids[:, -1:], past_key_values=past.past_key_values, use_cache=True)
    print(report.to_markdown() if args.markdown else report)
    if args.graphs:
        print("\n\n".join(report.graphs_after))
    return 0
