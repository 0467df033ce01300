"""Source cache: render each specialisation once, write it to a cache directory, import it.

`triton.jit` reads a kernel's source through `inspect`, so generated code must live in a real
file.  Files are named by the spec key and a hash of the text (a template change never reuses a
stale file) and written atomically, so concurrent processes can share the directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from functools import cache
from pathlib import Path
from types import ModuleType

from .spec import KernelSpec
from .template import render

__all__ = ["kernel_source", "load_kernels", "cache_dir", "interpreting", "used_specs"]

_LOCK = threading.Lock()
_MODULES: dict[tuple[KernelSpec, bool], ModuleType] = {}


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cache_dir() -> Path:
    """Where generated sources are written: $GAUGECOMPILE_KERNEL_CACHE, else ~/.cache/gaugecompile/kernels."""
    env = os.environ.get("GAUGECOMPILE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gaugecompile" / "kernels"


@cache
def _source(spec: KernelSpec, interpret: bool) -> str:
    return render(spec, interpret=interpret)


def kernel_source(spec: KernelSpec, *, interpret: bool | None = None) -> str:
    """The generated Triton source for `spec` (cached by spec).

    `interpret` defaults to the current mode: the interpreter's text differs only for bfloat16,
    whose matmul operands it must widen to float32.
    """
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"spec: expected a gaugecompile.codegen.KernelSpec, got {type(spec).__name__}")
    return _source(spec, interpreting() if interpret is None else bool(interpret))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def load_kernels(spec: KernelSpec) -> ModuleType:
    """The imported module holding `spec`'s kernels (attribute names `rqa_<key>`, `merge_<key>`)."""
    interpret = interpreting()
    module = _MODULES.get((spec, interpret))
    if module is not None:
        return module
    with _LOCK:
        module = _MODULES.get((spec, interpret))
        if module is not None:
            return module
        text = kernel_source(spec, interpret=interpret)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        name = f"gaugecompile_kernels.rqa_{spec.key}_{digest}"
        path = cache_dir() / f"rqa_{spec.key}_{digest}.py"
        if not path.exists() or path.read_text() != text:
            _write(path, text)
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        _MODULES[(spec, interpret)] = module
        return module


def used_specs() -> list[KernelSpec]:
    """Specialisations loaded in this process, in load order (what `explain` reports show)."""
    return [spec for spec, _ in _MODULES]
