"""`explain(model_or_fn, *args, **kwargs)`: run the gauge pipeline once and report what it rewrote/refused."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .backend import gauge_backend


@dataclass
class ExplainReport:
    """Sites rewritten/refused over every compiled graph, the graphs before/after, kernel sources."""

    rewritten: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    plain_attention: int = 0
    graphs_before: list[str] = field(default_factory=list)
    graphs_after: list[str] = field(default_factory=list)
    kernel_sources: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"gauge: {len(self.rewritten)} site(s) rewritten, {len(self.refused)} refused, "
                 f"{self.plain_attention} attention(s) without a cache, over {len(self.graphs_after)} graph(s)"]
        lines += [f"  rewritten: {s.describe()}" for s in self.rewritten]
        lines += [f"  refused:   {s.describe()}" for s in self.refused]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = ["| status | attention | gather | q RoPE | location | detail |", "|---|---|---|---|---|---|"]
        for s in self.rewritten + self.refused:
            detail = f"{s.pieces} op call(s)" if s.rewritten else s.reason
            rows.append(f"| {'rewritten' if s.rewritten else 'refused'} | {s.attention} | {s.gather} | {s.rope} "
                        f"| `{s.location}` | {detail.replace('|', '/')} |")
        graphs = "".join(f"\n\n<details><summary>graph {i} after</summary>\n\n```\n{g}\n```\n</details>"
                         for i, g in enumerate(self.graphs_after))
        return f"**{str(self).splitlines()[0]}**\n\n" + "\n".join(rows) + graphs


def explain(model_or_fn, *args, inner: str = "inductor", **kwargs) -> ExplainReport:
    """Compile `model_or_fn` with the gauge backend (fresh, caches off), call it once on args/kwargs."""
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
    return report
