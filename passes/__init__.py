"""Graph passes: find RoPE attention over gathered / re-rotated KV caches in ATen-level FX graphs and
rewrite each provable site into `gauge::rotated_query_attention` over the untouched block pools.

Public entry: `run_passes(gm, strict=False) -> PassReport`.
"""

from .pipeline import GaugeGraphPass, run_on_graph, run_passes
from .report import GaugeRefusedError, PassReport, Site
from .rope_detect import RopeMatch, match_rope

__all__ = ["run_passes", "run_on_graph", "GaugeGraphPass", "PassReport", "Site", "GaugeRefusedError",
           "RopeMatch", "match_rope"]
