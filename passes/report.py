"""What the passes found: one `Site` per attention over cached keys, gathered in a `PassReport`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Site", "PassReport", "GaugeRefusedError"]


class GaugeRefusedError(RuntimeError):
    """Raised in strict mode when a site cannot be proven equivalent; the message quotes the reason."""


@dataclass
class Site:
    """One attention site.  `reason` is empty for rewritten sites, the failed condition otherwise."""

    node: str
    attention: str  # "sdpa" / "sdpa-flash-cpu" / ... / "eager-chain"
    gather: str  # "materialize_kv", "cat", "cat+index_select", "rerotation", "static-cache", ...
    rope: str  # RoPE kind applied to the queries ("rotate-half", "interleaved", "complex", "+partial", "none")
    location: str
    rewritten: bool
    reason: str = ""
    pieces: int = 0
    assumes: str = ""  # a condition the rewritten graph checks at run time (raises if it fails)
    #: per op call: (q shape, k_pool shape, dtype name, rotary_dim, interleaved, causal) at the traced sizes
    kernels: list[tuple] = field(default_factory=list)

    def describe(self) -> str:
        """One line: what, where, and why not (for refused sites)."""
        head = f"{self.attention} over {self.gather} (q rope: {self.rope}) at {self.location}"
        if self.rewritten:
            note = f" (checked at run time: {self.assumes})" if self.assumes else ""
            return f"{head} -> rotated_query_attention x{self.pieces}{note}"
        return f"{head} -> refused: {self.reason}"


@dataclass
class PassReport:
    """Sites rewritten and refused in one graph, plus attentions with no cache behind them."""

    rewritten: list[Site] = field(default_factory=list)
    refused: list[Site] = field(default_factory=list)
    plain_attention: int = 0
    #: int8 weight-only matmuls over bfloat16 activations fused into `_weight_int8pack_mm` (`int8_weights.py`)
    int8_matmuls: int = 0

    def add(self, site: Site) -> None:
        (self.rewritten if site.rewritten else self.refused).append(site)

    def extend(self, other: PassReport) -> None:
        self.rewritten.extend(other.rewritten)
        self.refused.extend(other.refused)
        self.plain_attention += other.plain_attention
        self.int8_matmuls += other.int8_matmuls
