"""Generated Triton kernels for `gauge::rotated_query_attention`.

`triton_attention` runs them (on CUDA, or on the CPU under TRITON_INTERPRET=1); `KernelSpec` /
`spec_for` name a specialisation and `kernel_source` returns its generated text.
"""

from .cache import cache_dir, kernel_source, used_specs
from .op import triton_attention
from .spec import KernelSpec, spec_for

__all__ = ["KernelSpec", "cache_dir", "kernel_source", "spec_for", "triton_attention", "used_specs"]
