"""Pass reports kept next to Inductor's compile cache, so a cache hit still has its report.

Inductor's FX graph cache and AOT-autograd cache skip the post-grad passes on a hit: without this, the
backend would have to turn the caches off whenever someone wants the report (`explain`, the demo, a
`report_sink`), and recompile a 30-layer model from scratch every time.  Each compile stores the reports
its passes produced under a key of everything the compiled graph depends on that the caches key on too
(the Dynamo graph's code, the example inputs' metadata, the passes' source hash and options); a hit
replays them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

__all__ = ["report_key", "load_reports", "store_reports"]


def _directory() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "gauge_reports"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"T{tuple(x.shape)}{tuple(x.stride())}{x.dtype}{x.device}"
    return repr(x)


def report_key(gm: torch.fx.GraphModule, example_inputs, pass_uuid: bytes, keep_graphs: bool) -> str:
    """A digest of the Dynamo graph, its inputs' shapes/strides/dtypes, the passes' hash and options."""
    digest = hashlib.sha256()
    digest.update(gm.code.encode())
    digest.update(repr([_describe(x) for x in example_inputs]).encode())
    digest.update(pass_uuid)
    digest.update(b"graphs" if keep_graphs else b"")
    digest.update(torch.__version__.encode())
    return digest.hexdigest()


def store_reports(key: str, reports: list) -> None:
    """Save (PassReport, graph_before, graph_after) entries; a failed write only costs a later recompile."""
    path = _directory() / f"{key}.pkl"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(reports))
        tmp.replace(path)
    except OSError:
        pass


def load_reports(key: str) -> list | None:
    """The entries stored under `key`, or None."""
    try:
        return pickle.loads((_directory() / f"{key}.pkl").read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None
