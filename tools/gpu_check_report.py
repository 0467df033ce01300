"""The GPU check's JSON report (`tools/gpu_check.py`): its layout, where it goes, and how it is checked and written.

One document per run: the machine, one entry per step and a one-line summary per step. It is rewritten after
every step (atomically, strict JSON), so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpu_check_plan import STATUSES, TOOL_FILE, StepResult, machine_info

#: Identifies the layout of the JSON file (bump on an incompatible change).
SCHEMA = "gaugecompile.gpu_check/1"


def utc_now() -> dt.datetime:
    """The time now, in UTC (the report's and each step's clock)."""
    return dt.datetime.now(dt.timezone.utc)


def iso_utc(moment: dt.datetime) -> str:
    """`moment` as the report writes times: ISO 8601 to the second, with Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def default_out_path(moment: dt.datetime | None = None, root: Path | None = None) -> Path:
    """benchmarks/results/<UTC date>/gpu_check.json in the checkout (`root`, default repo_root())."""
    moment = moment or utc_now()
    return (root or repo_root()) / "benchmarks" / "results" / moment.strftime("%Y-%m-%d") / "gpu_check.json"


def repo_root() -> Path:
    """The checkout holding this file (tools/ at its top), else the working directory."""
    root = TOOL_FILE.parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "benchmarks").is_dir() else Path.cwd()


def _summary_entry(result: StepResult) -> str:
    return f"skipped: {result.note}" if result.status == "skipped" and result.note else result.status


def make_report(results: Sequence[StepResult], *, started: dt.datetime, budget_s: float, argv: Sequence[str],
                complete: bool, finished: dt.datetime | None = None) -> dict:
    """The JSON document: machine, one entry per step, a one-line summary per step, and `ok`."""
    finished = finished or utc_now()
    by_name = {r.name: r for r in results}
    probe_result = by_name.get("probe")
    cuda = probe_result.figures.get("cuda_available") if probe_result and probe_result.status == "passed" else None
    return {
        "schema": SCHEMA,
        "tool": "tools/gpu_check.py",
        "date": started.strftime("%Y-%m-%d"),
        "started_utc": iso_utc(started),
        "finished_utc": iso_utc(finished),
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


def finite_json(value):
    """`value` with non-finite floats as strings ("nan", "inf", "-inf"), so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def write_report(path: Path, doc: Mapping) -> Path:
    """Write `doc` as strict JSON to `path` atomically (a reader never sees half a file); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite_json(doc), indent=2, allow_nan=False) + "\n"
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
