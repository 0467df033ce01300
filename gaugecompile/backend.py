"""The `gauge` torch.compile backend (registered through the `torch_dynamo_backends` entry point).

    torch.compile(model, backend="gauge", options={"inner": "inductor", "strict": False})

inner="inductor" (default): Inductor compiles the graph and the passes run as its
`post_grad_custom_pre_pass` on the post-grad ATen graph, so the rewritten op is lowered as an
extern kernel next to Inductor's fused code.  inner="eager": AOT autograd traces the ATen graph,
the passes rewrite it and it runs as plain FX (for debugging: no Inductor involved).
strict=True: a site the passes cannot prove equivalent raises GaugeRefusedError with the reason
instead of being left as it was.
"""

from __future__ import annotations

import torch

_INNERS = ("inductor", "eager")


def _options(options: dict) -> tuple[str, bool, list | None, bool]:
    options = {**(options.pop("options", None) or {}), **options}  # torch.compile(options=...) arrives nested
    unknown = set(options) - {"inner", "strict", "report_sink", "keep_graphs"}
    if unknown:
        raise ValueError(f"options: unknown gauge backend option(s) {sorted(unknown)}; expected inner, strict")
    inner = options.get("inner", "inductor")
    if inner not in _INNERS:
        raise ValueError(f"options['inner']: expected one of {_INNERS}, got {inner!r}")
    return inner, bool(options.get("strict", False)), options.get("report_sink"), bool(options.get("keep_graphs"))


def _inductor(gm: torch.fx.GraphModule, example_inputs, strict: bool, sink: list, keep: bool):
    """Inductor with the passes as its post-grad custom pass.  On a compile-cache hit the passes do not run;
    their reports are replayed from `report_cache` (or, if missing there, the graph is compiled again with
    the caches off, so a report is never lost)."""
    from torch._inductor.compile_fx import compile_fx

    from gaugecompile.passes import GaugeGraphPass
    from gaugecompile.passes.report_cache import load_reports, report_key, store_reports

    graph_pass = GaugeGraphPass(strict=strict, sink=[], keep_graphs=keep)
    key = report_key(gm, example_inputs, graph_pass.uuid(), keep)
    compiled = compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": graph_pass})
    if not graph_pass.sink:
        cached = load_reports(key)
        if cached is not None:
            sink.extend(cached)
            return compiled
        compiled = compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": graph_pass,
                                                                  "force_disable_caches": True})
    store_reports(key, graph_pass.sink)
    sink.extend(graph_pass.sink)
    return compiled


def gauge_backend(gm: torch.fx.GraphModule, example_inputs, **options):
    """Compile `gm`: ATen graph -> gauge passes -> Inductor (or plain FX with inner="eager").

    `report_sink` (a list) receives one (PassReport, graph_before, graph_after) per compiled graph;
    `gaugecompile.explain` uses it.
    """
    import gaugecompile.ops  # noqa: F401  (registers the gauge ops when used through the entry point)
    from gaugecompile.passes import run_passes

    inner, strict, sink, keep = _options(options)
    sink = sink if sink is not None else []
    if inner == "inductor":
        return _inductor(gm, example_inputs, strict, sink, keep)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(fw: torch.fx.GraphModule, inputs):
        before = str(fw.graph) if keep else ""
        report = run_passes(fw, strict=strict)
        sink.append((report, before, str(fw.graph) if keep else ""))
        return make_boxed_func(fw.forward)

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=make_boxed_func)(gm, example_inputs)
