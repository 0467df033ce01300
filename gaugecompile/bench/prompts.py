"""The prompts the demo, the benchmarks and the examples share, and how an answer prints.

Real English text (`pydoc_data.topics`, shipped with Python, so no download) where a tokenizer is given, seeded
random ids where not (a `--random` model has none), so that every run of a scenario feeds the same tokens.
"""

from __future__ import annotations

import torch

__all__ = ["QUESTION", "text_ids", "chat_ids", "decode"]

QUESTION = "What is the capital of France? Answer in one sentence."


def text_ids(tokenizer, vocab_size: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """`length` token ids of real English text (pydoc_data.topics); random ids without a tokenizer."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: length * 8], return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"length: pydoc_data.topics gives only {ids.shape[1]} tokens, asked {length}")
    return ids


def chat_ids(tokenizer, vocab_size: int, message: str, *, seed: int = 1) -> torch.Tensor:
    """`message` as one user turn of the tokenizer's chat template, ready for the answer; 24 random ids without a
    tokenizer."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (1, 24), generator=torch.Generator().manual_seed(seed))
    messages = [{"role": "user", "content": message}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).input_ids


def decode(tokenizer, tokens: list[int]) -> str:
    """`tokens` as the quoted text they spell, or the ids themselves without a tokenizer."""
    return repr(tokenizer.decode(tokens, skip_special_tokens=True)) if tokenizer is not None else str(tokens)
