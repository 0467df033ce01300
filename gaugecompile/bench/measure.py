"""How the benchmark suite measures and records: medians of timed runs after a warm-up, ratios, the machine.

Shared by the scenarios of `suite` and `synthetic` and by the batched-generation benchmark, so every figure is
timed and every results file describes its machine the same way.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["log", "timed", "ratio", "machine", "weight_bytes", "kv_elements"]


def log(message: str) -> None:
    """A progress line on stderr, so that stdout holds only the tables."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object], repeat: int = 5, undo: Callable[[], object] | None = None) -> float:
    """Median seconds of `fn()` over `repeat` runs (after one warm-up); `undo()` restores the state after each
    run, outside the timed region."""
    samples = []
    for index in range(repeat + 1):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if undo is not None:
            undo()
        if index:
            samples.append(elapsed)
    return statistics.median(samples)


def ratio(base: float, gauge: float) -> float:
    """How many times faster gauge is than the baseline (inf where gauge took no measurable time)."""
    return base / gauge if gauge > 0 else float("inf")


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (torchao) by its inner tensors, as stored."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters as stored (`parameters()` yields a tied embedding once)."""
    return sum(_stored_bytes(p) for p in model.parameters())


def kv_elements(config, tokens: int) -> int:
    """K and V elements of every layer of a decoder `config` at `tokens` of context (what a decode step reads)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens


def machine() -> dict:
    """The machine the figures were measured on: platform, CPU model, cores, torch threads, Python."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(platform=platform.platform(), cpu=cpu, isa=isa_path(), cores=os.cpu_count(),
                torch_threads=torch.get_num_threads(), python=platform.python_version())


def isa_path() -> str:
    """The vector ISA the native kernels are compiled for here (-march=native): "AVX-512", "AVX2" or another."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))).split()
    except (OSError, StopIteration):
        return platform.machine()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()

