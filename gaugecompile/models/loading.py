"""`load()` and the shared `--model` / `--random` command-line options."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .random_configs import ARCHITECTURES, random_model
from .smollm import default_checkpoint, gguf_to_plain

__all__ = ["add_model_arguments", "encode", "load", "model_from_args"]


def load(name_or_path: str | Path | None = None, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode: the default SmolLM2-135M-Instruct, a checkpoint directory or a .gguf file."""
    import transformers

    if name_or_path is None:
        path = default_checkpoint()
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return gguf_to_plain(path, dtype)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"name_or_path: expected None, a transformers checkpoint directory or a .gguf file, "
                f"got {name_or_path!r}"
            )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def encode(tokenizer, vocab_size: int, text: str, length: int, seed: int = 0) -> torch.Tensor:
    """[1, <= length] ids of `text` (no special tokens); `length` random ids without a tokenizer (a random
    model has none), reproducible by `seed`."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :length]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model PATH` (checkpoint dir or .gguf) or `--random ARCH`; neither means the default real model."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", metavar="PATH", help="a local transformers checkpoint directory or a .gguf file "
                       "(default: SmolLM2-135M-Instruct, downloaded once into the user cache)")
    group.add_argument("--random", metavar="ARCH", choices=ARCHITECTURES,
                       help=f"a small random model instead, no download: one of {', '.join(ARCHITECTURES)}")


def model_from_args(args: argparse.Namespace, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) chosen by `add_model_arguments`' options; the tokenizer is None for a random model."""
    if getattr(args, "random", None):
        return random_model(args.random, dtype=dtype), None
    return load(getattr(args, "model", None), dtype=dtype)
