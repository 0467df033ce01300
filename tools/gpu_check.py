"""The GPU check (issue 20): one script, one run on a CUDA machine, one JSON file with everything.

Written for one H200 and a run of at most 8 minutes (`--budget-s`, default 480). In order of importance:

1. probe: the machine (GPU, driver, CUDA, Python; torch, triton, onnxruntime and its providers), in a subprocess;
2. install: the project as the README says plus the gpu extra, `pip install -e ".[test,gpu]"` (`--no-install`
   skips it). Where that fails (an offline machine whose preinstalled torch differs from the pins), the wheels
   carried in `--wheels DIR` and then the project itself are installed without dependencies, so every later
   step still runs, against the machine's own torch; the probe is repeated to record what is installed;
3. tests-triton: the Triton kernel tests with the kernels compiled for real: TRITON_INTERPRET unset and
   GAUGECOMPILE_TRITON_DEVICE=cuda, which tests/conftest.py turns into CUDA tensors;
4. gpu-decode: `gaugecompile.bench.gpu_decode` at 8k/32k/128k tokens, 32/8 heads, head dim 128, float16 and
   bfloat16, contiguous, one-delta and fragmented tables, against a device copy of the same bytes and SDPA over a
   contiguous (gathered) cache, all in one process;
5. onnx-cuda: the ONNX parity test on the CUDA execution provider (skipped by pytest, and recorded as skipped,
   where onnxruntime has no such provider);
6. demo: `gaugecompile demo` with the model on the GPU, if the demo has a `--device` option (read from its
   `--help`); otherwise recorded as "skipped: demo has no device option";
7. tests-rest: the rest of the test suite, as in 3 (pytest-xdist workers where it is installed).

Every step is a subprocess in its own process group with its own timeout, clipped to what is left of the
budget; a step that fails or times out is recorded (its group killed) and the next one runs. After every step
`benchmarks/results/<UTC date>/gpu_check.json` is rewritten (`complete: false` until the end), so a run cut
short still leaves what it measured. The file holds the machine, each step's status, exit code, duration,
command, environment changes and output tail, and the figures read from its output (pytest counts, failures and
skip reasons; every gpu_decode row).

Without CUDA the probe says so, no other step runs (each is recorded as skipped, with the reason), and the exit
status is 0. Otherwise it is 0 when no step failed or timed out, else 1.

A CI tool of the source checkout, not part of the installed package: it installs the package. Only the standard
library is imported at the top, so the check runs before the project is installed (the package itself imports
torch and needs the install's package mapping for `gaugecompile.codegen`); `benchmarks/gpu_check.py` runs this
file by path.

    python tools/gpu_check.py [--no-install] [--wheels DIR] [--budget-s 480] [--copy-to DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SCHEMA", "STATUSES", "STEP_GROUPS", "Step", "StepResult", "parse_args", "build_plan", "run_plan", "run_step",
    "parse_pytest", "make_report", "validate_report", "write_report", "read_report", "default_out_path", "probe",
    "main",
]

#: Identifies the layout of the JSON file (bump on an incompatible change).
SCHEMA = "gaugecompile.gpu_check/1"
#: passed: exit 0 (and its output read); failed: non-zero exit or an unusable result; timeout: killed at its
#: limit; skipped: not started, `note` says why (or pytest skipped every test); error: could not be started.
STATUSES = ("passed", "failed", "timeout", "skipped", "error")
MODULE_FILE = Path(__file__).resolve()
PROBE_MARKER = "GPU_CHECK_PROBE "
#: Runs `gaugecompile` with the same interpreter, whatever is on PATH.
CLI = "import sys; from gaugecompile.cli import main; sys.exit(main(sys.argv[1:]))"
#: The environment of every step that runs generated kernels: compiled, not interpreted, tests on CUDA tensors.
CUDA_ENV: dict[str, str | None] = {"TRITON_INTERPRET": None, "GAUGECOMPILE_TRITON_DEVICE": "cuda"}
#: Set for every step: output not held back, pip never prompts or checks its own version.
COMMON_ENV = {"PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
KERNEL_TESTS = ("tests/codegen/test_codegen_kernels.py", "tests/codegen/test_codegen_source.py")
ONNX_CUDA_TEST = "tests/onnx/test_onnx_export.py::test_cuda_provider_matches_torch"
DECODE_CONTEXTS = (8192, 32768, 131072)
DECODE_DTYPES = ("float16", "bfloat16")
DECODE_TABLES = ("contiguous", "one-delta", "fragmented")
DECODE_SHAPE = dict(heads=32, kv_heads=8, head_dim=128)
#: Seconds kept back from the budget: the grace of stopping a step at its limit (STOP_GRACE_S), and the JSON file.
RESERVE_S = 10.0
#: On timeout: SIGINT (pytest then prints its summary of what ran), this long, SIGTERM, 2 s, SIGKILL.
STOP_GRACE_S = 5.0
#: A step with less than this left of the budget is recorded as skipped rather than started.
MIN_STEP_S = 5.0
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
#: Distributions whose versions the probe records (importlib.metadata, nothing imported).
PACKAGES = ("gaugecompile", "torch", "triton", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "numpy", "pytest", "pytest-xdist", "hypothesis", "setuptools", "pip")


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; bad values exit with status 2 like any argparse error."""
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-install", action="store_true", help="skip the install steps (already installed)")
    parser.add_argument("--wheels", type=Path, metavar="DIR",
                        help="carried wheels: pip installs from DIR only (--no-index --find-links DIR), and where "
                             "the README install fails, DIR's wheels and the project are installed without deps")
    parser.add_argument("--no-index", action="store_true", help="pip uses no package index (an offline machine)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget of the whole check in seconds (default 480)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="the JSON file (default benchmarks/results/<UTC date>/gpu_check.json in the checkout)")
    parser.add_argument("--copy-to", type=Path, metavar="DIR",
                        help="also keep a copy of the JSON file in DIR, rewritten after every step")
    parser.add_argument("--only", nargs="+", choices=tuple(STEP_GROUPS), metavar="STEP",
                        help=f"run only these steps (the probe always runs): {', '.join(STEP_GROUPS)}")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8],
                        help="batch sizes of the decode benchmark (default 1 8)")
    parser.add_argument("--decode-rep-ms", type=int, default=100,
                        help="time budget of each decode measurement in ms (default 100)")
    parser.add_argument("--pytest-workers", type=int, default=8,
                        help="pytest-xdist workers for tests-rest where xdist is installed; 0: one process (default 8)")
    parser.add_argument("--pytest-args", default="", help="extra arguments for tests-rest, one shell-quoted string")
    parser.add_argument("--demo-args", default="", help="extra arguments for the demo, one shell-quoted string")
    parser.add_argument("--tail-chars", type=int, default=4000,
                        help="characters of each step's output kept in the JSON file (default 4000)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the probe step's own entry
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    if args.tail_chars < 0 or args.pytest_workers < 0 or args.decode_rep_ms < 1:
        parser.error("--tail-chars and --pytest-workers must be >= 0, --decode-rep-ms >= 1")
    if any(b < 1 for b in args.decode_batches):
        parser.error(f"--decode-batches: expected positive integers, got {args.decode_batches}")
    for name in ("pytest_args", "demo_args"):
        try:
            shlex.split(getattr(args, name))
        except ValueError as exc:
            parser.error(f"--{name.replace('_', '-')}: {exc}")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels: {args.wheels} is not a directory")
    return args


# ----------------------------------------------------------------------------- the plan


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
    probe_cmd = (python, str(MODULE_FILE), "--probe")
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


# ----------------------------------------------------------------------------- execution


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def step_environment(changes: Mapping[str, str | None], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment of a step: `base` (default os.environ), COMMON_ENV, then `changes` (None: unset)."""
    env = dict(os.environ if base is None else base)
    env.update(COMMON_ENV)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group `pid` leads (ours: started with start_new_session); False if it is gone."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the step's whole process group: SIGINT first (pytest reports what ran), then SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 2.0)):
        if not _signal_group(proc.pid, sig):
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_tail(handle, limit: int) -> str:
    """The last `limit` characters of the log file `handle` (decoded leniently)."""
    if limit <= 0:
        return ""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 4 * limit))
    return handle.read().decode("utf-8", "replace")[-limit:]


def run_step(step: Step, timeout_s: float | None, *, cwd: Path, tail_chars: int = 4000,
             max_log_bytes: int = 32 * 2**20) -> StepResult:
    """Run one step: its own process group and limit; stdout and stderr together into a log file.

    On timeout the whole group is terminated (pytest's compile workers too), and whatever the step left
    running after a normal exit is killed. The output is read for figures (`interpret`).
    """
    env = step_environment(step.env)
    started = _iso(_utc_now())
    result = StepResult(step.name, "error", timeout_s=None if timeout_s is None else round(timeout_s, 1),
                        command=step.command_line(), env=dict(step.env), started_utc=started, note=step.note)
    with tempfile.TemporaryFile() as log:
        begin = time.monotonic()
        try:
            proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True)
        except OSError as exc:
            result.note = _join(result.note, f"could not start: {exc}")
            return result
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except BaseException:  # interrupted: leave nothing running, then let it propagate
            _stop(proc)
            raise
        finally:
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers of a finished step
        result.duration_s = round(time.monotonic() - begin, 2)
        result.returncode = proc.returncode
        result.tail = _read_tail(log, tail_chars)
        log.seek(max(0, log.seek(0, os.SEEK_END) - max_log_bytes))
        text = log.read().decode("utf-8", "replace")
    if timed_out:
        result.status = "timeout"
        result.note = _join(result.note, f"killed after its {timeout_s:.0f} s limit")
    else:
        result.status = "passed" if proc.returncode == 0 else "failed"
    try:
        interpret(step, result, text)
    except Exception as exc:  # a parser bug must not lose the step's record
        result.note = _join(result.note, f"could not read the output: {exc!r}")
    return result


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def cuda_skip_reason(results: Mapping[str, StepResult]) -> str | None:
    """Why a CUDA step cannot run, from the first probe; None when the probe found CUDA."""
    probe_result = results.get("probe")
    if probe_result is None:
        return "no machine probe ran"
    if probe_result.status != "passed":
        return "the machine probe failed, so CUDA could not be confirmed"
    if not probe_result.figures.get("cuda_available"):
        return "CUDA is not available on this machine"
    return None


def run_plan(steps: Sequence[Step], *, budget_s: float, cwd: Path, tail_chars: int = 4000,
             on_result: Callable[[StepResult, list[StepResult]], None] | None = None,
             reserve_s: float = RESERVE_S, min_step_s: float = MIN_STEP_S) -> list[StepResult]:
    """Run the steps in order within `budget_s`, each to its own limit, going on after any failure.

    A step is skipped (with its reason) when planned so, when it needs CUDA and the probe found none, when its
    condition says so, or when less than `min_step_s` is left of the budget (less `reserve_s`). `on_result` is
    called after every step with that step's result and all results so far.
    """
    deadline = time.monotonic() + budget_s
    results: dict[str, StepResult] = {}
    for step in steps:
        reason = cuda_skip_reason(results) if step.needs_cuda else None
        reason = reason or step.skip
        if reason is None and step.when is not None:
            reason = step.when(results)
        left = deadline - time.monotonic() - reserve_s
        if reason is None and left < min_step_s:
            reason = f"budget exhausted ({max(left, 0.0):.0f} s left of --budget-s {budget_s:g})"
        if reason is not None:
            result = StepResult(step.name, "skipped", command=step.command_line(), env=dict(step.env), note=reason)
        else:
            if step.resolve is not None:
                step = step.resolve(step, results)
            limit = left if step.timeout_s is None else min(float(step.timeout_s), left)
            result = run_step(step, limit, cwd=cwd, tail_chars=tail_chars)
        results[step.name] = result
        if on_result is not None:
            on_result(result, list(results.values()))
    return list(results.values())


# ----------------------------------------------------------------------------- reading outputs

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)\b")
_PYTEST_FINAL = re.compile(r"\b(passed|failed|skipped|errors?|no tests ran|deselected)\b.* in \d+(\.\d+)?s\b")
_PYTEST_SKIP = re.compile(r"^SKIPPED \[\d+\] (.+?): (.*)$")
_PYTEST_FAIL = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")
#: One test's line under -v: `path::test[id] PASSED [ 5%]`, or with xdist `[gw0] [ 5%] PASSED path::test[id]`.
_PYTEST_VERBOSE = re.compile(r"^(?:(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                             r"|\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+))")
_VERBOSE_WORDS = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
                  "XFAIL": "xfailed", "XPASS": "xpassed"}


def parse_pytest(text: str, limit: int = 100) -> dict:
    """pytest -v -rfEs output: counts, failed/errored test ids, skip reasons, usage errors.

    The counts come from pytest's final line; where there is none (a step killed before pytest could write
    it), from the per-test lines of -v, and `counts_from` says which.
    """
    lines = text.splitlines()
    final = next((line.strip("= ") for line in reversed(lines) if _PYTEST_FINAL.search(line)), None)
    counts: dict[str, int] = {}
    if final is not None:
        for number, word in _PYTEST_COUNT.findall(final):
            word = {"error": "errors", "warning": "warnings"}.get(word, word)
            counts[word] = counts.get(word, 0) + int(number)
    progress: dict[str, int] = {}
    failures, skips, usage = [], [], []
    for line in lines:
        if m := _PYTEST_VERBOSE.match(line):
            word = _VERBOSE_WORDS[m.group(2) or m.group(3)]
            progress[word] = progress.get(word, 0) + 1
        elif m := _PYTEST_FAIL.match(line):
            failures.append(line if len(line) < 300 else line[:297] + "...")
        elif m := _PYTEST_SKIP.match(line):
            skips.append(f"{m.group(1)}: {m.group(2)}")
        elif line.startswith("ERROR: ") or line.startswith("ImportError while loading conftest"):
            usage.append(line)
    counts_from = "summary" if final is not None else ("progress lines" if progress else None)
    return dict(summary=final, counts=counts if final is not None else progress, counts_from=counts_from,
                failures=failures[:limit], failures_total=len(failures), skipped=skips[:limit],
                usage_errors=usage[:10])


def _interpret_pytest(result: StepResult, text: str) -> None:
    figures = parse_pytest(text)
    result.figures = figures
    counts = figures["counts"]
    if result.status == "timeout":
        return
    if result.returncode == 5:
        result.status, result.note = "failed", _join(result.note, "pytest collected no tests")
    elif result.returncode == 4:
        result.note = _join(result.note, "pytest usage error: " + "; ".join(figures["usage_errors"] or ["see tail"]))
    elif result.returncode == 0 and counts.get("skipped") and not counts.get("passed"):
        result.status = "skipped"
        result.note = _join(result.note, "pytest skipped every test: " + "; ".join(figures["skipped"] or ["?"]))


def _interpret_probe(result: StepResult, text: str) -> None:
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith(PROBE_MARKER)), None)
    if line is None:
        if result.status == "passed":
            result.status, result.note = "failed", _join(result.note, "the probe printed no result")
        return
    result.figures = json.loads(line[len(PROBE_MARKER):])


def decode_goals(rows: Sequence[Mapping]) -> dict:
    """The bandwidth goal counted over the gpu_decode rows: contexts >= 8k at >= 80% of each copy."""
    long_rows = [r for r in rows if r.get("context", 0) >= 8192]

    def at_80(key: str) -> str:
        measured = [r[key] for r in long_rows if isinstance(r.get(key), int | float)]
        return f"{sum(v >= 80 for v in measured)}/{len(measured)}"

    return {"cells": len(rows), "cells_8k_plus": len(long_rows), "at_80pct_of_copy": at_80("pct_of_copy"),
            "at_80pct_of_same_bytes_copy": at_80("pct_of_same_bytes_copy")}


def _interpret_gpu_decode(step: Step, result: StepResult) -> None:
    files = sorted(glob.glob(os.path.join(step.artifacts or "", "gpu_decode_*.json")), key=os.path.getmtime)
    if not files:
        if result.status == "passed":
            result.status = "failed"
            result.note = _join(result.note, "gpu_decode exited 0 without a result file (see tail)")
        return
    data = json.loads(Path(files[-1]).read_text())
    rows = data.get("rows", [])
    result.figures = {"header": data.get("header", {}), "goals": decode_goals(rows), "rows": rows}
    markdown = Path(files[-1]).with_suffix(".md")
    if markdown.is_file():
        result.figures["table"] = markdown.read_text()


def demo_device_option(help_text: str) -> str | None:
    """'--device' when the demo's --help lists that option (not a longer one such as --device-map), else None."""
    return "--device" if re.search(r"(?<![\w-])--device(?![\w-])", help_text) else None


def interpret(step: Step, result: StepResult, text: str) -> None:
    """Read the figures of `step`'s output into `result`, correcting its status where the output says more."""
    if step.kind == "pytest":
        _interpret_pytest(result, text)
    elif step.kind == "probe":
        _interpret_probe(result, text)
    elif step.kind == "gpu_decode":
        _interpret_gpu_decode(step, result)
    elif step.kind == "demo_help":
        result.figures = {"device_option": demo_device_option(text)}


# ----------------------------------------------------------------------------- the report


def default_out_path(moment: dt.datetime | None = None, root: Path | None = None) -> Path:
    """benchmarks/results/<UTC date>/gpu_check.json in the checkout (`root`, default repo_root())."""
    moment = moment or _utc_now()
    return (root or repo_root()) / "benchmarks" / "results" / moment.strftime("%Y-%m-%d") / "gpu_check.json"


def repo_root() -> Path:
    """The checkout holding this file (tools/ at its top), else the working directory."""
    root = MODULE_FILE.parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "benchmarks").is_dir() else Path.cwd()


def _summary_entry(result: StepResult) -> str:
    return f"skipped: {result.note}" if result.status == "skipped" and result.note else result.status


def make_report(results: Sequence[StepResult], *, started: dt.datetime, budget_s: float, argv: Sequence[str],
                complete: bool, finished: dt.datetime | None = None) -> dict:
    """The JSON document: machine, one entry per step, a one-line summary per step, and `ok`."""
    finished = finished or _utc_now()
    by_name = {r.name: r for r in results}
    probe_result = by_name.get("probe")
    cuda = probe_result.figures.get("cuda_available") if probe_result and probe_result.status == "passed" else None
    return {
        "schema": SCHEMA,
        "tool": "tools/gpu_check.py",
        "date": started.strftime("%Y-%m-%d"),
        "started_utc": _iso(started),
        "finished_utc": _iso(finished),
        "duration_s": round((finished - started).total_seconds(), 1),
        "budget_s": budget_s,
        "argv": list(argv),
        "complete": complete,
        "cuda_available": None if cuda is None else bool(cuda),
        "machine": machine_info(by_name),
        "ok": all(r.status in ("passed", "skipped") for r in results),
        "summary": {r.name: _summary_entry(r) for r in results},
        "steps": [r.to_dict() for r in results],
    }


_TOP_LEVEL = {"schema": str, "tool": str, "date": str, "started_utc": str, "finished_utc": str,
              "duration_s": (int, float), "budget_s": (int, float), "argv": list, "complete": bool,
              "cuda_available": (bool, type(None)), "machine": dict, "ok": bool, "summary": dict, "steps": list}
_STEP_FIELDS = {"name": str, "status": str, "returncode": (int, type(None)), "duration_s": (int, float),
                "timeout_s": (int, float, type(None)), "command": (str, type(None)), "env": dict,
                "started_utc": (str, type(None)), "note": str, "figures": dict, "tail": str}


def validate_report(doc: Mapping) -> list[str]:
    """What is wrong with `doc` as a gpu_check report (empty when it follows the schema)."""
    problems = []
    for key, kind in _TOP_LEVEL.items():
        if key not in doc:
            problems.append(f"missing {key!r}")
        elif not isinstance(doc[key], kind):
            problems.append(f"{key!r}: unexpected type {type(doc[key]).__name__}")
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
    for index, step in enumerate(doc.get("steps") or []):
        label = f"steps[{index}] ({step.get('name', '?')})"
        for key, kind in _STEP_FIELDS.items():
            if key not in step:
                problems.append(f"{label}: missing {key!r}")
            elif not isinstance(step[key], kind):
                problems.append(f"{label}: {key!r} has type {type(step[key]).__name__}")
        status = step.get("status")
        if status not in STATUSES:
            problems.append(f"{label}: status {status!r} not in {STATUSES}")
        if status == "skipped" and not step.get("note") and not step.get("figures"):
            problems.append(f"{label}: skipped without a reason")
        if status in ("passed", "failed") and not isinstance(step.get("returncode"), int):
            problems.append(f"{label}: {status} without an exit code")
        if status == "failed" and step.get("returncode") == 0 and not step.get("note"):
            problems.append(f"{label}: failed with exit code 0 and no note")
    names = [s.get("name") for s in doc.get("steps") or []]
    if isinstance(doc.get("summary"), dict) and set(doc["summary"]) != set(names):
        problems.append("summary: names differ from the steps'")
    return problems


def _finite(value):
    """`value` with non-finite floats as strings ("nan", "inf", "-inf"), so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(path: Path, doc: Mapping) -> Path:
    """Write `doc` as strict JSON to `path` atomically (a reader never sees half a file); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_report(path: Path) -> dict:
    """The document `write_report` wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the probe


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


# ----------------------------------------------------------------------------- main


def _log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def _report_step(result: StepResult) -> None:
    code = "" if result.returncode is None else f"rc {result.returncode}, "
    extra = f" -- {result.note}" if result.note else ""
    _log(f"{result.name}: {result.status} ({code}{result.duration_s:.1f} s){extra}")
    if result.name in ("probe", "machine") and result.figures:
        f = result.figures
        _log(f"  {f.get('gpu_name')} | driver {f.get('driver')} | CUDA {f.get('cuda_runtime')} | torch "
             f"{f.get('torch')} | triton {f.get('triton')} | onnxruntime {f.get('onnxruntime')} "
             f"{f.get('onnxruntime_providers')}")
    elif result.figures.get("summary"):
        _log(f"  {result.figures['summary']}")
    elif result.figures.get("goals"):
        _log(f"  {result.figures['goals']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when no step failed or timed out (or there is no CUDA), 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.probe:
        print(PROBE_MARKER + json.dumps(_finite(probe())), flush=True)
        return 0
    started = _utc_now()
    out = Path(args.out) if args.out is not None else default_out_path(started)
    copies = [out] + ([Path(args.copy_to) / out.name] if args.copy_to is not None else [])

    def save(results: list[StepResult], complete: bool) -> dict:
        doc = make_report(results, started=started, budget_s=args.budget_s, argv=argv, complete=complete)
        for path in copies:
            write_report(path, doc)
        return doc

    _log(f"budget {args.budget_s:g} s; results in {out}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        steps = build_plan(args, python=sys.executable, work_dir=Path(work))
        results = run_plan(steps, budget_s=args.budget_s, cwd=repo_root(), tail_chars=args.tail_chars,
                           on_result=lambda result, so_far: (_report_step(result), save(so_far, False)))
    doc = save(results, True)
    if doc["cuda_available"] is not True:
        probe_result = results[0]
        if probe_result.status != "passed":
            print(f"gpu_check: the machine probe failed ({probe_result.note or 'see the tail in ' + str(out)}); "
                  "no GPU step was run.", file=sys.stderr)
            return 1
        print(f"gpu_check: CUDA is not available on this machine; no GPU step was run (recorded in {out}).",
              file=sys.stderr)
        return 0
    for result in results:
        if result.status in ("failed", "timeout", "error"):
            _log(f"--- {result.name}: last lines of its output")
            print("\n".join(result.tail.splitlines()[-15:]), flush=True)
    _log(f"{'all steps passed or were skipped' if doc['ok'] else 'some steps failed'}; wrote {out}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
