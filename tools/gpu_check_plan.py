"""The GPU check's steps (`tools/gpu_check.py` runs them): what each step is, what it did, and the plan.

A step is a planned subprocess (`Step`); its record in the JSON file is a `StepResult`. `build_plan` turns the
command line into every step in running order, with the conditions that decide at run time whether a step
runs (the fallback install, the demo's device option, pytest-xdist where the probe found it). Nothing here is
run: `gpu_check_run` runs the plan. Standard library only, like the whole check.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: passed: exit 0 (and its output read); failed: non-zero exit or an unusable result; timeout: killed at its
#: limit; skipped: not started, `note` says why (or pytest skipped every test); error: could not be started.
STATUSES = ("passed", "failed", "timeout", "skipped", "error")
#: The check's entry script, beside this file: the probe steps run it again with --probe.
TOOL_FILE = Path(__file__).resolve().with_name("gpu_check.py")
#: Runs `gaugecompile` with the same interpreter, whatever is on PATH.
CLI = "import sys; from gaugecompile.cli import main; sys.exit(main(sys.argv[1:]))"
#: The environment of every step that runs generated kernels: compiled, not interpreted, tests on CUDA tensors.
CUDA_ENV: dict[str, str | None] = {"TRITON_INTERPRET": None, "GAUGECOMPILE_TRITON_DEVICE": "cuda"}
KERNEL_TESTS = ("tests/codegen/test_codegen_kernels.py", "tests/codegen/test_codegen_source.py")
ONNX_CUDA_TEST = "tests/onnx/test_onnx_export.py::test_cuda_provider_matches_torch"
DECODE_CONTEXTS = (8192, 32768, 131072)
DECODE_DTYPES = ("float16", "bfloat16")
DECODE_TABLES = ("contiguous", "one-delta", "fragmented")
DECODE_SHAPE = dict(heads=32, kv_heads=8, head_dim=128)
#: Selectable steps (--only) and the helper steps that go with each.
STEP_GROUPS: dict[str, tuple[str, ...]] = {
    "install": ("install", "install-wheels", "install-project", "machine"),
    "tests-triton": ("tests-triton",),
    "gpu-decode": ("gpu-decode",),
    "onnx-cuda": ("onnx-cuda",),
    "demo": ("demo-help", "demo"),
    "tests-rest": ("tests-rest",),
}
INSTALL_STEPS = ("install", "install-wheels", "install-project")


@dataclass
class StepResult:
    """What one step did; `to_dict()` is its entry in the JSON file's `steps` list."""

    name: str
    status: str
    returncode: int | None = None
    duration_s: float = 0.0
    timeout_s: float | None = None
    command: str | None = None
    env: dict[str, str | None] = field(default_factory=dict)
    started_utc: str | None = None
    note: str = ""
    figures: dict = field(default_factory=dict)
    tail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> StepResult:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})



def join_notes(*parts: str) -> str:
    """A step's note from its non-empty parts, "; " between them (a note grows as the step's output is read)."""
    return "; ".join(p for p in parts if p)


#: Decides at run time, from the results so far, whether a step is skipped: the reason, or None to run it.
Condition = Callable[[Mapping[str, StepResult]], "str | None"]


@dataclass(frozen=True)
class Step:
    """One planned subprocess: its command, limit and environment, and how its output is read.

    timeout_s: None gives the step whatever the budget leaves. env: changes to the environment (None removes a
    variable). needs_cuda: skipped unless the probe found CUDA. kind: how figures are read from the output
    ("probe", "pytest", "gpu_decode", "demo_help" or "plain"). skip: a reason known when planning. when: a
    reason found at run time. resolve: adjusts the step to the results so far (e.g. xdist where installed).
    artifacts: a directory where the step leaves result files to read.
    """

    name: str
    command: tuple[str, ...]
    timeout_s: float | None
    env: Mapping[str, str | None] = field(default_factory=dict)
    needs_cuda: bool = True
    kind: str = "plain"
    skip: str | None = None
    when: Condition | None = None
    resolve: Callable[[Step, Mapping[str, StepResult]], Step] | None = None
    artifacts: str | None = None
    note: str = ""

    def command_line(self) -> str:
        return shlex.join(self.command)


def _after_failed(name: str) -> Condition:
    """Run only when step `name` ran and did not pass (the fallback install)."""

    def condition(results: Mapping[str, StepResult]) -> str | None:
        result = results.get(name)
        if result is None or result.status == "skipped":
            return f"{name} did not run"
        return f"{name} passed" if result.status == "passed" else None

    return condition


def _something_installed(results: Mapping[str, StepResult]) -> str | None:
    if any(r.status != "skipped" for n, r in results.items() if n in INSTALL_STEPS):
        return None
    return "nothing was installed: the first probe stands"


def _demo_has_device_option(results: Mapping[str, StepResult]) -> str | None:
    helped = results.get("demo-help")
    if helped is None or helped.status != "passed":
        return "could not read the demo's options (demo-help did not pass)"
    return None if helped.figures.get("device_option") else "demo has no device option"


def machine_info(results: Mapping[str, StepResult]) -> dict:
    """The latest probe that passed (after the install if one ran), else {}."""
    for name in ("machine", "probe"):
        result = results.get(name)
        if result is not None and result.status == "passed" and result.figures:
            return dict(result.figures)
    return {}


def _with_xdist(workers: int) -> Callable[[Step, Mapping[str, StepResult]], Step]:
    """Adds `-n workers --dist loadfile` (and per-worker thread limits) where the probe found pytest-xdist."""

    def resolve(step: Step, results: Mapping[str, StepResult]) -> Step:
        if workers < 1:
            return step
        info = machine_info(results)
        if not (info.get("packages") or {}).get("pytest-xdist"):
            return dataclasses.replace(step, note="pytest-xdist is not installed: one process")
        threads = str(max(1, int(info.get("cpu_count") or workers) // workers))
        env = {**step.env, "OMP_NUM_THREADS": threads, "TORCHINDUCTOR_COMPILE_THREADS": threads}
        command = (*step.command, "-n", str(workers), "--dist", "loadfile")
        return dataclasses.replace(step, command=command, env=env, note=f"{workers} pytest-xdist workers")

    return resolve


def build_plan(args: argparse.Namespace, *, python: str, work_dir: Path) -> list[Step]:
    """Every step in running order, from the arguments alone (nothing is run; --wheels DIR is listed).

    python: the interpreter for every step. work_dir: a scratch directory for result files (gpu_decode's).
    """
    pip = (python, "-m", "pip", "install")
    wheels = None if args.wheels is None else Path(args.wheels).resolve()
    if wheels is not None:
        index: tuple[str, ...] = ("--no-index", "--find-links", str(wheels))
    else:
        index = ("--no-index",) if args.no_index else ()
    wheel_files = tuple(sorted(glob.glob(str(wheels / "*.whl")))) if wheels is not None else ()
    pytest = (python, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider")  # -v: one line per test
    probe_cmd = (python, str(TOOL_FILE), "--probe")
    no_install = "--no-install" if args.no_install else None
    decode_dir = work_dir / "gpu_decode"
    decode = (python, "-m", "gaugecompile.bench.gpu_decode",
              "--batches", *map(str, args.decode_batches), "--contexts", *map(str, DECODE_CONTEXTS),
              "--heads", str(DECODE_SHAPE["heads"]), "--kv-heads", str(DECODE_SHAPE["kv_heads"]),
              "--head-dim", str(DECODE_SHAPE["head_dim"]), "--dtype", *DECODE_DTYPES, "--tables", *DECODE_TABLES,
              "--copy-same-bytes", "--rep-ms", str(args.decode_rep_ms), "--out", str(decode_dir))
    rest = (*pytest, *(f"--ignore={path}" for path in KERNEL_TESTS), "--deselect", ONNX_CUDA_TEST,
            *shlex.split(args.pytest_args))
    steps = [
        Step("probe", probe_cmd, 90, needs_cuda=False, kind="probe"),
        Step("install", (*pip, "-e", ".[test,gpu]", *index), 150, skip=no_install),
        Step("install-wheels", (*pip, "--no-index", "--no-deps", *wheel_files), 120,
             skip=no_install or (None if wheel_files else "no --wheels" if wheels is None
                                 else f"no wheels in {wheels}"),
             when=_after_failed("install")),
        Step("install-project", (*pip, "--no-index", "--no-deps", "--no-build-isolation", "-e", "."), 120,
             skip=no_install, when=_after_failed("install")),
        Step("machine", probe_cmd, 90, kind="probe", skip=no_install, when=_something_installed),
        Step("tests-triton", (*pytest, *KERNEL_TESTS), 210, env=CUDA_ENV, kind="pytest"),
        Step("gpu-decode", decode, 180, env=CUDA_ENV, kind="gpu_decode", artifacts=str(decode_dir)),
        Step("onnx-cuda", (*pytest, ONNX_CUDA_TEST), 120, env=CUDA_ENV, kind="pytest"),
        Step("demo-help", (python, "-c", CLI, "demo", "--help"), 60, kind="demo_help"),
        Step("demo", (python, "-c", CLI, "demo", "--device", "cuda", *shlex.split(args.demo_args)), 240,
             env=CUDA_ENV, when=_demo_has_device_option),
        Step("tests-rest", rest, None, env=CUDA_ENV, kind="pytest", resolve=_with_xdist(args.pytest_workers)),
    ]
    if args.only:
        chosen = {name for group in args.only for name in STEP_GROUPS[group]} | {"probe"}
        steps = [s if s.name in chosen else dataclasses.replace(s, skip="not selected (--only)") for s in steps]
    return steps
