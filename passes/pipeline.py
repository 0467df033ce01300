"""`run_passes`: detect attention sites, plan their KV sources, prove, rewrite; plus the Inductor hook."""

from __future__ import annotations

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .attention_detect import AttentionMatch, find_attention
from .fx_utils import AnalysisError, concrete, layout_root, location, real_mode, size_envs
from .int8_weights import fuse_int8_weight_matmuls
from .kv_detect import plan_kv
from .report import GaugeRefusedError, PassReport, Site
from .rewriter import check_rewrite, is_impure, rewrite
from .rope_detect import match_rope


def _rope_kind(q) -> str:
    match = match_rope(layout_root(q)) or match_rope(q)
    return match.kind if match is not None else "none"


def concrete_shape_of(t: torch.Tensor, env: dict) -> tuple[int, ...]:
    """A fake tensor's shape at the traced sizes."""
    return tuple(concrete(tuple(t.shape), env))


def _site(graph: fx.Graph, site: AttentionMatch, owner, run_time_masks: bool) -> tuple[Site | None, bool]:
    """Analyse (and if proven, rewrite) one site. Returns (record, is_cache_site)."""
    record = Site(node=site.anchor.name, attention=site.form, gather="?", rope="?",
                  location=location(site.anchor), rewritten=False)
    try:
        record.rope = _rope_kind(site.q)
        plan = plan_kv(site.k, site.v)
        record.gather = plan.label
        if not plan.from_cache:
            return None, False
        flags = check_rewrite(graph, site, plan, owner, run_time_masks)
        rewrite(graph, site, plan, flags)
        record.rewritten, record.pieces = True, len(plan.pieces)
        env = size_envs(graph)[0]
        record.kernels = [(concrete_shape_of(q, env), concrete_shape_of(kp, env), str(q.dtype).removeprefix("torch."),
                           int(rot), bool(inter), bool(causal)) for q, kp, rot, inter, causal in site.kernels]
        checks = (("q_len == kv_len", site.assume_square),
                  ("mask == causal, else masked attention over the view", site.check_mask))
        record.assumes = ", ".join(cond for cond, on in checks if on)
    except AnalysisError as exc:
        record.reason = str(exc)
    except (RuntimeError, IndexError, TypeError, ValueError, AttributeError) as exc:  # unexpected structure
        record.reason = f"the site's structure could not be analysed ({type(exc).__name__}: {exc})"
    return record, True


@real_mode
def run_on_graph(graph: fx.Graph, *, strict: bool = False, owner: torch.nn.Module | None = None,
                 run_time_masks: bool = True) -> PassReport:
    """The passes on a bare FX graph (Inductor's post-grad hook hands one over)."""
    report = PassReport()
    owner = owner if owner is not None else graph.owning_module
    found_all = find_attention(graph)
    outs = [n for m in found_all if isinstance(m, AttentionMatch) and m.out is not None for n in (m.out, *m.lse_users)]
    for found in found_all:
        if not isinstance(found, AttentionMatch):
            node, reason = found
            report.add(Site(node.name, str(node.target), "?", "?", location(node), False, reason))
            continue
        if found.out is None:
            continue
        found.peers = outs
        record, is_site = _site(graph, found, owner, run_time_masks)
        if not is_site:
            report.plain_attention += 1
        else:
            report.add(record)
    if report.refused and strict:
        raise GaugeRefusedError("gauge (strict): " + " | ".join(s.describe() for s in report.refused))
    if report.rewritten:
        graph.eliminate_dead_code(is_impure_node=is_impure)
        graph.lint()
    return report


def run_passes(gm: fx.GraphModule, *, strict: bool = False, run_time_masks: bool = True) -> PassReport:
    """Rewrite every provable attention-over-cache site of an ATen-level graph in place.

    Works on Inductor post-grad graphs, AOT-autograd graphs and `ExportedProgram.graph_module`.
    Refused sites are left exactly as they were; with `strict=True` a refusal raises
    GaugeRefusedError quoting the failed condition.  A mask only known at run time over a
    `materialize_kv` view becomes `gauge::rotated_query_attention_masked` (rotated-query attention
    when the mask is causal, masked attention otherwise); `run_time_masks=False` refuses such sites
    instead (ONNX export: the exported graph has no fallback path), and those whose keys a token index
    gathers (the rewrite checks that index's range at run time, as `index_select` does).
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm: expected a torch.fx.GraphModule, got {type(gm).__name__}")
    report = run_on_graph(gm.graph, strict=strict, owner=gm, run_time_masks=run_time_masks)
    if report.rewritten:
        gm.recompile()
    return report


class GaugeGraphPass(CustomGraphPass):
    """Inductor `post_grad_custom_pre_pass`: runs the passes and appends each graph's report to `sink`."""

    def __init__(self, strict: bool = False, sink: list | None = None, keep_graphs: bool = False):
        self.strict = strict
        self.sink = sink if sink is not None else []
        self.keep_graphs = keep_graphs

    def __call__(self, graph: fx.Graph) -> None:
        before = str(graph) if self.keep_graphs else ""
        report = run_on_graph(graph, strict=self.strict)
        # an Inductor lowering choice, so here and not in run_on_graph (ONNX export runs that one)
        report.int8_matmuls = fuse_int8_weight_matmuls(graph)
        self.sink.append((report, before, str(graph) if self.keep_graphs else ""))

    def uuid(self) -> bytes:
        import pathlib

        here = pathlib.Path(__file__).parent
        files = tuple(sorted(str(p) for p in here.glob("*.py")))
        return get_hash_for_files(files) + (b"strict" if self.strict else b"")
