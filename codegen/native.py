"""Native CPU kernels: render the C++ for a spec, compile it on first use, call it.

`native_attention` and `native_materialize` are the CPU implementations of `gauge::rotated_query_attention`
and `gauge::materialize_kv`.  Like the Triton kernels (`launcher`) they take the RoPE frequencies `inv_freq` and
reduce the angles exactly (`gaugecompile.rope.block_angles`, once per forward) into the one cos and one sin per
table entry that the kernel reads.  Each head dim's translation unit (`native_template.render_cpp`) is compiled
once through `torch.utils.cpp_extension` (with ninja, a declared dependency) into the kernel cache
directory, under a name that hashes the source, the compiler flags, torch's version and the machine's CPU
flags (the code is built for the machine it runs on), so a cache shared between machines or versions never
loads a stale build.  Where no C++ compiler is found the ops run their torch loop instead, after one warning
that says so; `native_available()` tells which path runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

from gaugecompile.block_tables import check_mapping_values
from gaugecompile.kv_format import format_of
from gaugecompile.rope import accumulation_dtype, block_angles

from .cache import cache_dir
from .native_template import native_namespace, render_cpp
from .spec import KernelSpec, spec_for

__all__ = [
    "compiler_missing", "native_attention", "native_available", "native_library", "native_materialize",
    "native_source",
]

# -fopenmp: ATen's `at::parallel_for` is an inline `#pragma omp parallel` in its header, so a translation unit
# built without it runs every parallel loop on one thread.  The runtime is torch's own (libgomp.so.1, loaded by
# libtorch_cpu under the same soname), so no second thread pool appears.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]
_LOCK = threading.Lock()
_LIBS: dict[int, Any] = {}  # head dim -> its loaded library (one specialisation per head dim: native_key)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def compiler_missing() -> str | None:
    """Why no native kernel can be built here, or None."""
    if os.environ.get("GAUGECOMPILE_NATIVE", "1").lower() in ("0", "false", "off", "no"):
        return "GAUGECOMPILE_NATIVE=0 is set"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) on PATH"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


@functools.cache
def native_available() -> bool:
    """Whether the native kernels can run here (else the ops use their torch loop); looked up once a process
    (`native_available.cache_clear()` looks again), with one warning that says why where they cannot."""
    reason = compiler_missing()
    if reason is not None:
        warnings.warn(f"gaugecompile: {reason}; the CPU ops run their torch loop instead of the native kernel",
                      RuntimeWarning, stacklevel=3)
    return reason is None


def native_source(spec: KernelSpec) -> str:
    """The generated C++ text that serves `spec`."""
    return render_cpp(spec)


def native_library(spec: KernelSpec) -> Any:
    """The loaded `torch.ops` namespace holding `attention` and `materialize` for `spec` (compiled on first use)."""
    lib = _LIBS.get(spec.head_dim)
    if lib is not None:
        return lib
    with _LOCK:
        lib = _LIBS.get(spec.head_dim)
        if lib is not None:
            return lib
        namespace = native_namespace(spec)
        text = render_cpp(spec)
        stamp = "\n".join([text, *_FLAGS, *_LDFLAGS, torch.__version__, _cpu_flags()])
        digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        name = f"{namespace}_{digest}"
        build = cache_dir() / "native" / name
        build.mkdir(parents=True, exist_ok=True)
        source = build / f"{namespace}.cpp"
        if not source.exists() or source.read_text() != text:
            source.write_text(text)
        from torch.utils.cpp_extension import load

        load(name=name, sources=[str(source)], extra_cflags=_FLAGS, extra_ldflags=_LDFLAGS,
             build_directory=str(build), is_python_module=False, verbose=False)
        lib = getattr(torch.ops, namespace)
        _LIBS[spec.head_dim] = lib
        return lib


def _table(t: Tensor) -> Tensor:
    return t.to(torch.int64).contiguous()


def _delta_keys(block_delta: Tensor) -> Tensor:
    """The deltas as the kernel reads them: int64 values it compares (a run of equal deltas rotates the query once,
    delta 0 not at all) and range-checks.  The angles themselves come in cos/sin, so real-valued (learnable) deltas,
    checked here first, become the rank of their value among the distinct ones, with 0 kept as 0; integer ones
    are their own keys (converted to int64 by the kernel)."""
    if not block_delta.is_floating_point():
        return _table(block_delta)
    _, rank = torch.unique(block_delta.detach(), return_inverse=True)
    return torch.where(block_delta == 0, 0, rank + 1).contiguous()


def _check_real_deltas(block_table: Tensor, block_delta: Tensor, block_lens: Tensor, k_pool: Tensor,
                       min_length: int, length: int | None = None) -> None:
    """The value checks the kernel makes on integer deltas, made here for real ones (the kernel sees their ranks)."""
    if block_delta.is_floating_point():
        check_mapping_values(block_table, block_delta, block_lens, k_pool.shape[0], k_pool.shape[1], min_length,
                             length)


def native_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor,
    inv_freq: Tensor, rotary_dim: int, interleaved: bool, scale: float, causal: bool, window: int = 0,
    softcap: float = 0.0, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rotated-query attention on shape-checked CPU inputs (pools of any KV format with unit stride in head_dim,
    scales beside compressed ones); the kernel checks the values (ids, counts, deltas) and raises ValueError naming
    the argument.

    inv_freq: float64 [rotary_dim // 2].  Returns out (q's dtype, contiguous) and lse (float32, float64 for float64
    inputs).
    """
    cos, sin = block_angles(block_delta, inv_freq, accumulation_dtype(q.dtype))
    lib = _LIBS.get(q.shape[-1]) or native_library(spec_for(q, k_pool, rotary_dim, interleaved, causal))
    if block_delta.is_floating_point():
        _check_real_deltas(block_table, block_delta, block_lens, k_pool, q.shape[2])
        block_delta = _delta_keys(block_delta)
    return lib.attention(q, k_pool, v_pool, block_table, block_delta, block_lens, cos, sin, float(scale),
                         bool(causal), int(window), float(softcap), bool(interleaved), k_scale, v_scale)


def native_materialize(
    k_pool: Tensor, v_pool: Tensor, block_table: Tensor, block_delta: Tensor, block_lens: Tensor, inv_freq: Tensor,
    rotary_dim: int, interleaved: bool, length: int, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    as_stored: bool = True,
) -> tuple[Tensor, Tensor]:
    """Gather + re-rotate on shape-checked CPU inputs (contiguous pools): K/V [batch, num_kv_heads, length, head_dim],
    in the pool's dtype where `as_stored` (a float format), else in float32 (float64 pools: float64), rows widened
    (compressed ones dequantized) before they are rotated.

    The kernel checks the values (ids, counts summing to `length`, deltas) and raises ValueError naming the argument."""
    fmt = format_of(k_pool, k_scale)
    dtype = k_pool.dtype if as_stored and not fmt.scaled else accumulation_dtype(k_pool.dtype)
    acc = accumulation_dtype(dtype)
    cos, sin = block_angles(block_delta, inv_freq, acc)
    head_dim = fmt.head_dim(k_pool.shape[3])
    shape = (block_table.shape[0], k_pool.shape[2], int(length), head_dim)
    k_out, v_out = k_pool.new_empty(shape, dtype=dtype), v_pool.new_empty(shape, dtype=dtype)
    if k_out.numel() == 0:
        return k_out, v_out
    _check_real_deltas(block_table, block_delta, block_lens, k_pool, 0, int(length))
    empty = k_pool.new_empty((0,), dtype=acc)
    name = str(dtype).removeprefix("torch.")
    lib = native_library(KernelSpec(head_dim, rotary_dim, interleaved, k_pool.shape[1], 1, name))
    lib.materialize(k_pool, v_pool, _table(block_table), _delta_keys(block_delta), _table(block_lens),
                    empty if cos is None else cos.contiguous(), empty if sin is None else sin.contiguous(),
                    bool(interleaved), k_out, v_out, k_scale, v_scale)
    return k_out, v_out
