"""Generated kernels for `gauge::rotated_query_attention`: Triton for GPUs, C++ for the CPU.

`triton_attention` runs the Triton kernels (on CUDA, or on the CPU under TRITON_INTERPRET=1); `KernelSpec` /
`spec_for` name a specialisation and `kernel_source` returns its generated text.  `native` holds the CPU
side: the C++ rendered from the same spec (`native_source`), compiled on first use.
"""

from .cache import cache_dir, kernel_source, used_specs
from .native import native_available, native_source
from .op import triton_attention
from .spec import KernelSpec, spec_for

__all__ = [
    "KernelSpec", "cache_dir", "kernel_source", "native_available", "native_source", "spec_for", "triton_attention",
    "used_specs",
]
