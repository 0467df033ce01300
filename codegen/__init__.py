"""Generated kernels for `gauge::rotated_query_attention`: Triton for GPUs, C++ for the CPU.

`KernelSpec` / `spec_for` name a specialisation and `kernel_source` returns its generated Triton text;
`launcher.launch` runs those kernels (on CUDA, or on the CPU under TRITON_INTERPRET=1), and the op layer wraps it
as a `triton_op` (`gaugecompile.ops.triton_attention`).  `native` holds the CPU side: the C++ rendered from the
same spec (`native_source`, from `templates/native_kernel.cpp`), compiled on first use.  Both families take the
RoPE frequencies `inv_freq` and reduce the angles exactly before their kernels run.

This package sits below the ops: it imports `gaugecompile.rope` and `gaugecompile.block_tables`, never
`gaugecompile.ops`.
"""

from .cache import cache_dir, kernel_source, used_specs
from .native import native_available, native_source
from .spec import KernelSpec, spec_for

__all__ = ["KernelSpec", "cache_dir", "kernel_source", "native_available", "native_source", "spec_for", "used_specs"]
