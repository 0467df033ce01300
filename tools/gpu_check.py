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
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# The check's parts are the gpu_check_*.py modules beside this file. The file is run as a script or loaded by
# path (benchmarks/gpu_check.py, the tests), never imported from a package, so their directory goes on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_outputs import demo_device_option, interpret, parse_pytest
from gpu_check_plan import (
    CLI,
    KERNEL_TESTS,
    ONNX_CUDA_TEST,
    STATUSES,
    STEP_GROUPS,
    TOOL_FILE,
    Step,
    StepResult,
    build_plan,
)
from gpu_check_probe import PROBE_MARKER, probe
from gpu_check_report import (
    SCHEMA,
    default_out_path,
    finite_json,
    make_report,
    read_report,
    repo_root,
    utc_now,
    validate_report,
    write_report,
)
from gpu_check_run import cuda_skip_reason, run_plan, run_step, step_environment

#: The check's API, gathered here from its modules (the tests and benchmarks/gpu_check.py load only this file).
__all__ = [
    "SCHEMA", "STATUSES", "STEP_GROUPS", "Step", "StepResult", "parse_args", "build_plan", "run_plan", "run_step",
    "parse_pytest", "make_report", "validate_report", "write_report", "read_report", "default_out_path", "probe",
    "main", "TOOL_FILE", "CLI", "KERNEL_TESTS", "ONNX_CUDA_TEST", "cuda_skip_reason", "step_environment",
    "interpret", "demo_device_option", "repo_root",
]


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
        print(PROBE_MARKER + json.dumps(finite_json(probe())), flush=True)
        return 0
    started = utc_now()
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
