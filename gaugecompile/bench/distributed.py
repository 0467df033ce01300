"""Helpers for scripts that run on several local ranks: relaunching under torchrun, counting collective bytes."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import torch

__all__ = ["ByteCounter", "under_torchrun", "relaunch"]


def under_torchrun() -> bool:
    """Whether this process is one rank of a `torch.distributed.run` launch."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run the main script (or `-m` module) again as `nproc` local ranks (`torch.distributed.run --standalone`)
    with arguments `argv`; its exit code."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    target = ["--module", spec.name] if spec is not None and spec.name else [sys.argv[0]]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *target, *argv]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                          ).returncode


class ByteCounter:
    """`with ByteCounter() as counter: ...` counts in `counter.bytes` the payload bytes of the torch.distributed
    collectives called inside the block, by wrapping them for its duration (`broadcast_object_list` and
    `all_gather_object` go through them too).  DTensor's own collectives (the model's tensor-parallel
    all-reduces) run as functional ops and are not counted: what is counted is what the caller sends itself,
    e.g. a ManifoldCache's edit records.  Wrap edits, not compiled forwards (Dynamo would trace the wrappers)."""

    NAMES = ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self) -> None:
        self.bytes = 0
        self._saved: list[tuple] = []

    def __enter__(self) -> ByteCounter:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in self.NAMES:  # both spellings: `dist.all_reduce` and c10d's own calls (broadcast_object_list)
            original = getattr(c10d, name)
            self._saved.append((name, original, getattr(dist, name)))
            wrapped = self._counting(original)
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, original, public in self._saved:
            setattr(c10d, name, original)
            setattr(dist, name, public)
        self._saved.clear()

    def _counting(self, original):
        @functools.wraps(original)
        def run(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            return original(tensor, *args, **kwargs)

        return run
