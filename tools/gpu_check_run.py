"""Running the GPU check's steps (`tools/gpu_check.py`): each a subprocess with its own limit, within a budget.

Every step runs in its own process group, so a step stopped at its limit takes its children (pytest's compile
workers) with it, and whatever a finished step left running is killed. A step that fails or times out is
recorded and the next one runs; a step is skipped, with its reason, where the plan, CUDA or the budget say so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gpu_check_outputs import interpret
from gpu_check_plan import Step, StepResult, join_notes
from gpu_check_report import iso_utc, utc_now

#: Set for every step: output not held back, pip never prompts or checks its own version.
COMMON_ENV = {"PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
#: Seconds kept back from the budget: the grace of stopping a step at its limit (STOP_GRACE_S), and the JSON file.
RESERVE_S = 10.0
#: On timeout: SIGINT (pytest then prints its summary of what ran), this long, SIGTERM, 2 s, SIGKILL.
STOP_GRACE_S = 5.0
#: A step with less than this left of the budget is recorded as skipped rather than started.
MIN_STEP_S = 5.0


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


def _interruptible() -> None:
    """In the step's process before it runs: SIGINT back to its default, so that the interrupt `_stop` sends first
    reaches pytest even when this check runs where SIGINT is ignored (an ignored signal is inherited across exec:
    pytest-xdist workers, nohup) -- else the step would only die at SIGTERM, without its summary."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
    started = iso_utc(utc_now())
    result = StepResult(step.name, "error", timeout_s=None if timeout_s is None else round(timeout_s, 1),
                        command=step.command_line(), env=dict(step.env), started_utc=started, note=step.note)
    with tempfile.TemporaryFile() as log:
        begin = time.monotonic()
        try:
            proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True, preexec_fn=_interruptible)
        except OSError as exc:
            result.note = join_notes(result.note, f"could not start: {exc}")
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
        result.note = join_notes(result.note, f"killed after its {timeout_s:.0f} s limit")
    else:
        result.status = "passed" if proc.returncode == 0 else "failed"
    try:
        interpret(step, result, text)
    except Exception as exc:  # a parser bug must not lose the step's record
        result.note = join_notes(result.note, f"could not read the output: {exc!r}")
    return result


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
