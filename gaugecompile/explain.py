"""`explain(model_or_fn, *args, **kwargs)`: run the gauge pipeline once and report what it rewrote/refused."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .backend import gauge_backend

_KERNEL_NOTE = ("generated Triton sources the CUDA path would run for the rewritten sites; "
                "on the CPU they are not launched (the CPU kernel runs instead)")


def kernel_specs_for(sites: list) -> list:
    """The codegen KernelSpec of every op call of the rewritten `sites` (from their traced q / pool metadata),
    without duplicates, in order."""
    from .codegen import spec_for

    specs: dict = {}
    for site in sites:
        for q_shape, pool_shape, dtype, rotary_dim, interleaved, causal in site.kernels:
            q = torch.empty(q_shape, dtype=getattr(torch, dtype), device="meta")
            pool = torch.empty(pool_shape, dtype=getattr(torch, dtype), device="meta")
            try:
                spec = spec_for(q, pool, rotary_dim, interleaved, causal)
            except (TypeError, ValueError):  # a dtype/shape the generated kernels do not cover: no CUDA kernel
                continue
            specs.setdefault(spec.key, spec)
    return list(specs.values())


@dataclass
class ExplainReport:
    """Sites rewritten/refused over every compiled graph, the graphs before/after, kernel sources."""

    rewritten: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    plain_attention: int = 0
    graphs_before: list[str] = field(default_factory=list)
    graphs_after: list[str] = field(default_factory=list)
    kernel_sources: list[str] = field(default_factory=list)
    kernel_specs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"gauge: {len(self.rewritten)} site(s) rewritten, {len(self.refused)} refused, "
                 f"{self.plain_attention} attention(s) without a cache, over {len(self.graphs_after)} graph(s)"]
        lines += [f"  rewritten: {s.describe()}" for s in self.rewritten]
        lines += [f"  refused:   {s.describe()}" for s in self.refused]
        if self.kernel_specs:
            lines.append(f"  kernels ({_KERNEL_NOTE}): " + ", ".join(self.kernel_specs))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = ["| status | attention | gather | q RoPE | location | detail |", "|---|---|---|---|---|---|"]
        for s in self.rewritten + self.refused:
            detail = f"{s.pieces} op call(s)" if s.rewritten else s.reason
            rows.append(f"| {'rewritten' if s.rewritten else 'refused'} | {s.attention} | {s.gather} | {s.rope} "
                        f"| `{s.location}` | {detail.replace('|', '/')} |")
        graphs = "".join(f"\n\n<details><summary>graph {i} after</summary>\n\n```\n{g}\n```\n</details>"
                         for i, g in enumerate(self.graphs_after))
        kernels = "".join(f"\n\n<details><summary>kernel {key}</summary>\n\n```python\n{src}\n```\n</details>"
                          for key, src in zip(self.kernel_specs, self.kernel_sources, strict=True))
        note = f"\n\nKernels: {_KERNEL_NOTE}." if self.kernel_specs else ""
        return f"**{str(self).splitlines()[0]}**\n\n" + "\n".join(rows) + note + kernels + graphs


def explain(model_or_fn, *args, inner: str = "inductor", **kwargs) -> ExplainReport:
    """Compile `model_or_fn` with the gauge backend (fresh Dynamo state; a compile-cache hit replays the reports
    stored with it), call it once on args/kwargs."""
    if not callable(model_or_fn):
        raise TypeError(f"model_or_fn: expected an nn.Module or callable, got {type(model_or_fn).__name__}")
    sink: list = []
    backend = functools.partial(gauge_backend, inner=inner, report_sink=sink, keep_graphs=True)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model_or_fn, backend=backend, dynamic=False)(*args, **kwargs)
    report = ExplainReport()
    for graph_report, before, after in sink:
        report.rewritten += graph_report.rewritten
        report.refused += graph_report.refused
        report.plain_attention += graph_report.plain_attention
        report.graphs_before.append(before)
        report.graphs_after.append(after)
    from .codegen import kernel_source

    for spec in kernel_specs_for(report.rewritten):
        report.kernel_specs.append(spec.key)
        report.kernel_sources.append(f"# {spec.key}: {_KERNEL_NOTE}\n" + kernel_source(spec))
    return report
