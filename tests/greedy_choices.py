"""Comparing a compiled low-precision run with its eager reference: logits within the dtype's tolerance and the same
greedy choices, except where the reference's own top two are a tie in that dtype."""

from __future__ import annotations

import torch


def generate_with_logits(model, cache, ids: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate()` over `cache`: (sequences, logits [steps, vocab] in float32)."""
    out = model.generate(ids, past_key_values=cache, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, attention_mask=torch.ones_like(ids), **kw)
    return out.sequences, torch.cat(out.logits).float()


def assert_same_choices(want: torch.Tensor, got: torch.Tensor, atol: float) -> None:
    """Logits [steps, vocab] agree within `atol`; each argmax is equal unless the reference's top two were within
    `atol` of each other (a tie in the model's dtype)."""
    want, got = want.float(), got.float()
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    for step, (w, g) in enumerate(zip(want, got, strict=True)):
        if w.argmax() != g.argmax():
            top = w.topk(2).values
            assert top[0] - top[1] <= atol, f"step {step}: token {g.argmax()} against {w.argmax()}, not a tie"
