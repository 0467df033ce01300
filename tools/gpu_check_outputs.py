"""Reading the GPU check's step outputs (`tools/gpu_check.py`): the figures each kind of step leaves.

pytest's counts, failures and skip reasons; the probe's line; gpu_decode's result files and its bandwidth goal;
whether the demo has a device option. Where the output says more than the exit code (pytest skipped every
test, or exited 0 without a result), the step's status is corrected, with a note.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpu_check_plan import Step, StepResult, join_notes
from gpu_check_probe import PROBE_MARKER

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
        result.status, result.note = "failed", join_notes(result.note, "pytest collected no tests")
    elif result.returncode == 4:
        usage = "; ".join(figures["usage_errors"] or ["see tail"])
        result.note = join_notes(result.note, "pytest usage error: " + usage)
    elif result.returncode == 0 and counts.get("skipped") and not counts.get("passed"):
        result.status = "skipped"
        result.note = join_notes(result.note, "pytest skipped every test: " + "; ".join(figures["skipped"] or ["?"]))


def _interpret_probe(result: StepResult, text: str) -> None:
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith(PROBE_MARKER)), None)
    if line is None:
        if result.status == "passed":
            result.status, result.note = "failed", join_notes(result.note, "the probe printed no result")
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
            result.note = join_notes(result.note, "gpu_decode exited 0 without a result file (see tail)")
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
