"""The GPU check's machine probe (`tools/gpu_check.py --probe`): GPU, driver, CUDA, Python and package versions.

It runs in a subprocess of the check (the probe step), before and after the install, and prints its result as
one line behind `PROBE_MARKER`. Standard library at the top; torch and onnxruntime are imported inside `probe`,
where a missing or broken one is recorded rather than raised.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

#: Starts the probe's one line of output (then its result as JSON).
PROBE_MARKER = "GPU_CHECK_PROBE "
#: Distributions whose versions the probe records (importlib.metadata, nothing imported).
PACKAGES = ("gaugecompile", "torch", "triton", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "numpy", "pytest", "pytest-xdist", "hypothesis", "setuptools", "pip")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> dict:
    """GPU names, driver and the driver's CUDA version from nvidia-smi ({"error": ...} without it)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    info: dict = {}
    try:
        query = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        info["gpus"] = [dict(zip(("name", "driver_version", "memory_total"), (p.strip() for p in line.split(",")),
                                 strict=False)) for line in query.stdout.splitlines() if line.strip()]
        banner = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
        if m := re.search(r"CUDA Version:\s*([\d.]+)", banner):
            info["cuda_driver_version"] = m.group(1)
    except (OSError, subprocess.SubprocessError) as exc:
        info["error"] = repr(exc)
    return info


def probe() -> dict:
    """The machine, as the JSON file's `machine` field: GPU, driver, CUDA, Python, package versions, providers."""
    info: dict = {"python": platform.python_version(), "python_executable": sys.executable,
                  "platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "triton_interpret": os.environ.get("TRITON_INTERPRET"),
                  "packages": {name: _dist_version(name) for name in PACKAGES}}
    spec = importlib.util.find_spec("gaugecompile")
    info["gaugecompile_location"] = None if spec is None else str(Path(spec.origin or "").parent)
    smi = _nvidia_smi()
    info["nvidia_smi"] = smi
    gpus = smi.get("gpus") or [{}]
    info["driver"] = gpus[0].get("driver_version")
    info["gpu_name"] = gpus[0].get("name")
    info["cuda_available"] = False
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_runtime"] = torch.version.cuda
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                        compute_capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                        gpu_memory_gib=round(props.total_memory / 2**30, 1))
    except Exception as exc:  # torch missing or broken: recorded, CUDA taken as unavailable
        info["torch_error"] = repr(exc)
    info["triton"] = info["packages"].get("triton")
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except Exception as exc:
        info["onnxruntime_error"] = repr(exc)
    return info
