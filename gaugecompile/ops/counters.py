"""Run-time counts of which path the attention ops took, as Inductor keeps `torch._dynamo.utils.counters`.

`runs["kernel"]` counts calls of `gauge::rotated_query_attention`'s kernel (any device, compiled graphs included:
a custom op's body is opaque to Dynamo), `runs["masked_fallback"]` the calls of the masked op whose run-time check
fell back to the gather + masked attention.  Tests and benchmarks read them to tell a fast step from a slow one;
`runs.clear()` resets them.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["runs"]

runs: Counter[str] = Counter()
