"""Test configuration: Triton runs in its CPU interpreter (must be set before triton is imported).

`GAUGECOMPILE_TRITON_DEVICE=cuda` (set by the GPU check, `tools/gpu_check.py`) leaves
TRITON_INTERPRET unset instead, so the generated kernels compile for real, and the kernel tests
(tests/codegen/test_codegen_kernels.py) put their tensors on that device. Unset or `cpu`: exactly the CPU default.
"""

import os

import pytest

TRITON_DEVICE = os.environ.get("GAUGECOMPILE_TRITON_DEVICE") or "cpu"

# Under pytest-xdist each worker takes its share of the cores (set before torch is imported, and inherited by the
# examples and ranks the tests start): with torch's default of one thread per core in every worker, the workers'
# threads would outnumber the cores and the parallel run would be no faster than a serial one.
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

if TRITON_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a device switch that cannot do what it says: an unknown device, the interpreter forced on, no CUDA."""
    if TRITON_DEVICE == "cpu":
        return
    if TRITON_DEVICE != "cuda" and not TRITON_DEVICE.startswith("cuda:"):
        raise pytest.UsageError(
            f"GAUGECOMPILE_TRITON_DEVICE: expected 'cpu', 'cuda' or 'cuda:N', got {TRITON_DEVICE!r}")
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        raise pytest.UsageError(f"GAUGECOMPILE_TRITON_DEVICE={TRITON_DEVICE} compiles the kernels for the GPU; "
                                "unset TRITON_INTERPRET")
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError(f"GAUGECOMPILE_TRITON_DEVICE={TRITON_DEVICE}, but CUDA is not available here")
