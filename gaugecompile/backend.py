"""The `gauge` torch.compile backend (registered through the `torch_dynamo_backends` entry point)."""

from __future__ import annotations

import torch


def gauge_backend(gm: torch.fx.GraphModule, example_inputs, **options):
    """Compile `gm` with Inductor (graph passes arrive with the passes issue)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
