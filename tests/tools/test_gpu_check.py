"""The GPU check's pure parts on the CPU: arguments, the step plan and its command lines, the JSON report, the
per-step timeout and continuation logic (with harmless `python -c` commands), and the no-CUDA path.

`tools/gpu_check.py` is a tool of the checkout, not a module of the package: it is loaded by file path, as
`benchmarks/gpu_check.py` runs it."""

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gaugecompile.bench import gpu_decode

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gcheck = _load_tool()
PY = sys.executable
PLAN_NAMES = ["probe", "install", "install-wheels", "install-project", "machine", "tests-triton", "gpu-decode",
              "onnx-cuda", "demo-help", "demo", "tests-rest"]


def plan(*argv: str, work_dir: Path = Path("/scratch")) -> dict[str, gcheck.Step]:
    steps = gcheck.build_plan(gcheck.parse_args(list(argv)), python="PY", work_dir=work_dir)
    assert [s.name for s in steps] == PLAN_NAMES
    return {s.name: s for s in steps}


def step(name: str, code: str, timeout_s: float | None = 20, **kw) -> gcheck.Step:
    """A harmless step: `python -c code`, no CUDA needed."""
    return gcheck.Step(name, (PY, "-c", code), timeout_s, needs_cuda=False, **kw)


def result(name: str, status: str, **kw) -> gcheck.StepResult:
    return gcheck.StepResult(name, status, **kw)


# ----------------------------------------------------------------------------- arguments


def test_defaults():
    args = gcheck.parse_args([])
    assert args.budget_s == 480 and not args.no_install and args.wheels is None and not args.no_index
    assert args.decode_batches == [1, 8] and args.decode_rep_ms == 100 and args.pytest_workers == 8
    assert args.out is None and args.copy_to is None and args.only is None and not args.probe


@pytest.mark.parametrize("argv", [["--budget-s", "0"], ["--budget-s", "-5"], ["--wheels", "/no/such/dir"],
                                  ["--pytest-args", "'unclosed"], ["--only", "everything"], ["--tail-chars", "-1"],
                                  ["--decode-batches", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gcheck.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the plan


def test_planned_command_lines():
    steps = plan()
    assert steps["probe"].command == ("PY", str(gcheck.TOOL_FILE), "--probe")
    assert not steps["probe"].needs_cuda and all(s.needs_cuda for n, s in steps.items() if n != "probe")
    assert steps["install"].command == ("PY", "-m", "pip", "install", "-e", ".[test,gpu]")
    assert steps["install"].skip is None and steps["install"].command_line().endswith("-e '.[test,gpu]'")
    assert steps["install-project"].command == ("PY", "-m", "pip", "install", "--no-index", "--no-deps",
                                                "--no-build-isolation", "-e", ".")
    assert steps["install-wheels"].skip == "no --wheels"
    assert steps["machine"].command == steps["probe"].command and steps["machine"].kind == "probe"

    pytest_cmd = ("PY", "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider")
    assert steps["tests-triton"].command == (*pytest_cmd, "tests/codegen/test_codegen_kernels.py",
                                             "tests/codegen/test_codegen_source.py")
    assert steps["onnx-cuda"].command == (*pytest_cmd,
                                          "tests/onnx/test_onnx_export.py::test_cuda_provider_matches_torch")
    assert steps["tests-rest"].command == (*pytest_cmd, "--ignore=tests/codegen/test_codegen_kernels.py",
                                           "--ignore=tests/codegen/test_codegen_source.py", "--deselect",
                                           "tests/onnx/test_onnx_export.py::test_cuda_provider_matches_torch")
    assert steps["tests-rest"].timeout_s is None  # whatever the budget leaves
    for name in ("tests-triton", "gpu-decode", "onnx-cuda", "demo", "tests-rest"):
        assert steps[name].env == {"TRITON_INTERPRET": None, "GAUGECOMPILE_TRITON_DEVICE": "cuda"}, name

    decode = steps["gpu-decode"]
    assert decode.command[:3] == ("PY", "-m", "gaugecompile.bench.gpu_decode")
    assert decode.command_line().endswith("--out /scratch/gpu_decode") and decode.artifacts == "/scratch/gpu_decode"
    assert steps["demo-help"].command == ("PY", "-c", gcheck.CLI, "demo", "--help")
    assert steps["demo"].command == ("PY", "-c", gcheck.CLI, "demo", "--device", "cuda")


def test_planned_decode_arguments_are_the_issues_sizes():
    """The decode command parses with gpu_decode's own parser into the issue's cells; its defaults are unchanged."""
    cmd = plan("--decode-batches", "1", "--decode-rep-ms", "50")["gpu-decode"].command
    args = gpu_decode.parse_args(list(cmd[3:]))
    assert args.contexts == [8192, 32768, 131072] and args.batches == [1] and args.rep_ms == 50
    assert (args.heads, args.kv_heads, args.head_dim) == (32, 8, 128)
    assert args.dtype == ["float16", "bfloat16"] and args.tables == ["contiguous", "one-delta", "fragmented"]
    assert args.copy_same_bytes and args.out == Path("/scratch/gpu_decode")
    default = gpu_decode.parse_args([])
    assert default.dtype == ["bfloat16"] and default.tables == ["fragmented"] and not default.copy_same_bytes
    assert default.batches == [1, 8, 32] and default.contexts == [1024, 8192, 32768, 131072]


def test_plan_no_install_wheels_only_and_extra_args(tmp_path):
    steps = plan("--no-install")
    assert all(steps[n].skip == "--no-install" for n in ("install", "install-wheels", "install-project", "machine"))

    (tmp_path / "b-1.0-py3-none-any.whl").write_text("")
    (tmp_path / "a-1.0-py3-none-any.whl").write_text("")
    steps = plan("--wheels", str(tmp_path))
    assert steps["install"].command[-3:] == ("--no-index", "--find-links", str(tmp_path))
    assert steps["install-wheels"].skip is None
    assert steps["install-wheels"].command == ("PY", "-m", "pip", "install", "--no-index", "--no-deps",
                                               str(tmp_path / "a-1.0-py3-none-any.whl"),
                                               str(tmp_path / "b-1.0-py3-none-any.whl"))
    assert plan("--no-index")["install"].command[-1] == "--no-index"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plan("--wheels", str(empty))["install-wheels"].skip == f"no wheels in {empty}"

    steps = plan("--only", "gpu-decode", "demo", "--pytest-args", "-m 'not slow'", "--demo-args", "--random llama")
    assert {n for n, s in steps.items() if s.skip is None} == {"probe", "gpu-decode", "demo-help", "demo"}
    assert steps["install"].skip == "not selected (--only)"
    assert steps["tests-rest"].command[-2:] == ("-m", "not slow")
    assert steps["demo"].command[-2:] == ("--random", "llama")


def test_the_planned_tests_exist():
    """The kernel test files and the ONNX CUDA-provider test the plan names are still there."""
    for path in gcheck.KERNEL_TESTS:
        assert (ROOT / path).is_file(), path
    path, name = gcheck.ONNX_CUDA_TEST.split("::")
    assert f"def {name}(" in (ROOT / path).read_text()


def test_run_time_conditions():
    assert gcheck.cuda_skip_reason({}) == "no machine probe ran"
    assert "could not be confirmed" in gcheck.cuda_skip_reason({"probe": result("probe", "failed", returncode=1)})
    no_cuda = {"probe": result("probe", "passed", returncode=0, figures={"cuda_available": False})}
    assert gcheck.cuda_skip_reason(no_cuda) == "CUDA is not available on this machine"
    assert gcheck.cuda_skip_reason({"probe": result("probe", "passed", figures={"cuda_available": True})}) is None

    fallback = plan()["install-project"].when
    assert fallback({"install": result("install", "passed")}) == "install passed"
    assert fallback({"install": result("install", "skipped", note="x")}) == "install did not run"
    assert fallback({"install": result("install", "failed", returncode=1)}) is None
    assert fallback({"install": result("install", "timeout")}) is None

    demo = plan()["demo"].when
    assert demo({"demo-help": result("demo-help", "passed", figures={"device_option": None})}) == \
        "demo has no device option"
    assert demo({"demo-help": result("demo-help", "passed", figures={"device_option": "--device"})}) is None
    assert "demo-help did not pass" in demo({"demo-help": result("demo-help", "failed", returncode=1)})


def test_demo_device_option_is_read_from_its_help():
    assert gcheck.demo_device_option("  --device DEVICE  where the model runs") == "--device"
    assert gcheck.demo_device_option("  --device-map MAP\n  --devices N") is None
    from gaugecompile.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    has_it = hasattr(parser.parse_args([]), "device")  # every option's default lands in the namespace
    assert gcheck.demo_device_option(parser.format_help()) == ("--device" if has_it else None)


def test_xdist_only_where_installed():
    rest = plan()["tests-rest"]
    with_xdist = {"probe": result("probe", "passed", figures={"cpu_count": 16, "packages": {"pytest-xdist": "3.8"}})}
    resolved = rest.resolve(rest, with_xdist)
    assert resolved.command[-4:] == ("-n", "8", "--dist", "loadfile")
    assert resolved.env["OMP_NUM_THREADS"] == "2" and resolved.env["TRITON_INTERPRET"] is None
    without = {"probe": result("probe", "passed", figures={"cpu_count": 16, "packages": {"pytest-xdist": None}})}
    assert rest.resolve(rest, without).command == rest.command
    assert "not installed" in rest.resolve(rest, without).note
    single = plan("--pytest-workers", "0")["tests-rest"]
    assert single.resolve(single, with_xdist) == single


def test_step_environment():
    env = gcheck.step_environment({"TRITON_INTERPRET": None, "X_NEW": "1"}, base={"TRITON_INTERPRET": "1", "A": "b"})
    assert "TRITON_INTERPRET" not in env and env["X_NEW"] == "1" and env["A"] == "b"
    assert env["PYTHONUNBUFFERED"] == "1"


# ----------------------------------------------------------------------------- execution


def test_each_step_has_its_own_timeout_and_the_run_goes_on(tmp_path):
    seen = []
    steps = [
        step("ok", "print('hello from ok')"),
        step("fails", "import sys; print('about to fail'); sys.exit(3)"),
        step("hangs", "import time; print('sleeping', flush=True); time.sleep(30)", timeout_s=1),
        step("missing", "", skip="planned skip"),
        gcheck.Step("no-such-program", ("/no/such/program",), 5, needs_cuda=False),
        step("after", "print('still ran')"),
    ]
    begin = time.monotonic()
    results = gcheck.run_plan(steps, budget_s=120, cwd=tmp_path, on_result=lambda r, so_far: seen.append(len(so_far)))
    assert time.monotonic() - begin < 20
    by = {r.name: r for r in results}
    assert [r.name for r in results] == [s.name for s in steps] and seen == [1, 2, 3, 4, 5, 6]
    assert by["ok"].status == "passed" and by["ok"].returncode == 0 and "hello from ok" in by["ok"].tail
    assert by["fails"].status == "failed" and by["fails"].returncode == 3 and "about to fail" in by["fails"].tail
    assert by["hangs"].status == "timeout" and by["hangs"].timeout_s == 1 and by["hangs"].duration_s < 10
    assert by["hangs"].returncode != 0 and "sleeping" in by["hangs"].tail and "limit" in by["hangs"].note
    assert by["missing"].status == "skipped" and by["missing"].note == "planned skip"
    assert by["no-such-program"].status == "error" and "could not start" in by["no-such-program"].note
    assert by["after"].status == "passed" and "still ran" in by["after"].tail
    assert all(r.started_utc for r in results if r.status not in ("skipped",))


def test_timeout_interrupts_first_so_pytest_can_report(tmp_path):
    """SIGINT comes first at the limit: pytest (here a stand-in) prints what ran before it is killed."""
    code = ("import time\ntry:\n    print('running', flush=True); time.sleep(30)\n"
            "except KeyboardInterrupt:\n    print('1 passed in 1.00s'); raise SystemExit(2)")
    res = gcheck.run_step(gcheck.Step("t", (PY, "-c", code), 1, needs_cuda=False, kind="pytest"), 1, cwd=tmp_path)
    assert res.status == "timeout" and res.returncode == 2 and res.duration_s < 5
    assert res.figures["counts"] == {"passed": 1} and res.figures["counts_from"] == "summary"


def test_timeout_kills_the_whole_process_group(tmp_path):
    """A step's children (pytest's compile workers, say) die with it."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    res = gcheck.run_step(step("spawns", code), 3, cwd=tmp_path)
    assert res.status == "timeout"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _running(child):
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its (new) parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_step_gets_at_most_what_the_budget_leaves(tmp_path):
    steps = [step("long", "import time; time.sleep(30)", timeout_s=None), step("next", "print(1)")]
    results = gcheck.run_plan(steps, budget_s=1.5, cwd=tmp_path, reserve_s=0, min_step_s=0.5)
    assert results[0].status == "timeout" and results[0].duration_s < 8 and results[0].timeout_s <= 1.5
    assert results[1].status == "skipped" and results[1].note.startswith("budget exhausted")


def test_gpu_steps_are_skipped_without_cuda(tmp_path):
    fake_probe = gcheck.Step("probe", (PY, "-c", "print('GPU_CHECK_PROBE ' + '{\"cuda_available\": false}')"), 20,
                             needs_cuda=False, kind="probe")
    gpu = gcheck.Step("gpu", (PY, "-c", "raise SystemExit(9)"), 20)
    results = gcheck.run_plan([fake_probe, gpu], budget_s=60, cwd=tmp_path)
    assert results[0].status == "passed" and results[0].figures == {"cuda_available": False}
    assert results[1].status == "skipped" and results[1].note == "CUDA is not available on this machine"


# ----------------------------------------------------------------------------- reading outputs

PYTEST_OUT = """\
..F.s
=========================== short test summary info ============================
SKIPPED [1] tests/onnx/test_onnx_export.py:119: this onnxruntime build has no CUDA execution provider
FAILED tests/codegen/test_codegen_kernels.py::test_edge_cases[bf16-causal-False] - AssertionError: (0.5, torch.bfloat16)
ERROR tests/test_x.py::test_y - RuntimeError: boom
1 failed, 3 passed, 1 skipped, 1 error, 2 warnings in 3.21s
"""


def test_parse_pytest():
    figures = gcheck.parse_pytest(PYTEST_OUT)
    assert figures["counts"] == {"failed": 1, "passed": 3, "skipped": 1, "errors": 1, "warnings": 2}
    assert figures["summary"].startswith("1 failed") and figures["failures_total"] == 2
    assert figures["failures"][0].startswith("FAILED tests/codegen/test_codegen_kernels.py::test_edge_cases")
    assert figures["skipped"] == ["tests/onnx/test_onnx_export.py:119: this onnxruntime build has no CUDA execution "
                                  "provider"]
    assert gcheck.parse_pytest("no tests ran in 0.01s")["summary"] == "no tests ran in 0.01s"
    assert gcheck.parse_pytest("===== 5 passed in 1.00s =====")["counts"] == {"passed": 5}


def test_parse_pytest_without_a_final_line_counts_the_verbose_lines():
    """A step killed before pytest's summary still reports what ran (-v lines, with and without xdist)."""
    text = ("tests/a.py::test_x[1] PASSED          [ 10%]\n"
            "tests/a.py::test_x[2] FAILED          [ 20%]\n"
            "[gw1] [ 30%] PASSED tests/b.py::test_y\n"
            "[gw0] [ 40%] SKIPPED tests/b.py::test_z\n")
    figures = gcheck.parse_pytest(text)
    assert figures["summary"] is None and figures["counts_from"] == "progress lines"
    assert figures["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert gcheck.parse_pytest("")["counts_from"] is None


@pytest.mark.parametrize("returncode,text,status,note", [
    (0, "s\nSKIPPED [1] t.py:3: no CUDA provider\n1 skipped in 0.50s\n", "skipped", "no CUDA provider"),
    (0, "..\n2 passed in 0.50s\n", "passed", ""),
    (5, "no tests ran in 0.01s\n", "failed", "collected no tests"),
    (4, "ERROR: GAUGECOMPILE_TRITON_DEVICE=cuda, but CUDA is not available here\n", "failed", "CUDA is not"),
    (1, PYTEST_OUT, "failed", ""),
])
def test_pytest_status(returncode, text, status, note):
    res = result("t", "passed" if returncode == 0 else "failed", returncode=returncode)
    gcheck.interpret(gcheck.Step("t", ("x",), 1, kind="pytest"), res, text)
    assert res.status == status and note in res.note


def test_gpu_decode_results_are_read(tmp_path):
    decode = gcheck.Step("gpu-decode", ("x",), 1, kind="gpu_decode", artifacts=str(tmp_path))
    missing = result("gpu-decode", "passed", returncode=0)
    gcheck.interpret(decode, missing, "gpu_decode: CUDA is not available on this machine; nothing measured.")
    assert missing.status == "failed" and "without a result file" in missing.note

    rows = [dict(dtype="float16", table="contiguous", batch=1, context=8192, pct_of_copy=85.0,
                 pct_of_same_bytes_copy=79.0, max_rel_err=float("nan")),
            dict(dtype="float16", table="contiguous", batch=1, context=1024, pct_of_copy=10.0,
                 pct_of_same_bytes_copy=None)]
    (tmp_path / "gpu_decode_H200_1.json").write_text(json.dumps(dict(header={"device": "H200"}, rows=rows)))
    (tmp_path / "gpu_decode_H200_1.md").write_text("| table |\n")
    found = result("gpu-decode", "passed", returncode=0)
    gcheck.interpret(decode, found, "")
    assert found.status == "passed" and found.figures["header"] == {"device": "H200"}
    assert found.figures["table"] == "| table |\n" and len(found.figures["rows"]) == 2
    assert found.figures["goals"] == {"cells": 2, "cells_8k_plus": 1, "at_80pct_of_copy": "1/1",
                                      "at_80pct_of_same_bytes_copy": "0/1"}


def test_probe_output_is_read():
    res = result("probe", "passed", returncode=0)
    gcheck.interpret(gcheck.Step("probe", ("x",), 1, kind="probe"), res,
                     'noise\nGPU_CHECK_PROBE {"cuda_available": true, "gpu_name": "H200"}\n')
    assert res.figures == {"cuda_available": True, "gpu_name": "H200"}
    silent = result("probe", "passed", returncode=0)
    gcheck.interpret(gcheck.Step("probe", ("x",), 1, kind="probe"), silent, "Traceback ...")
    assert silent.status == "failed" and "no result" in silent.note


# ----------------------------------------------------------------------------- the report


def test_report_round_trip_schema_and_a_failed_step(tmp_path):
    steps = [step("probe", "print('GPU_CHECK_PROBE ' + '{\"cuda_available\": true, \"gpu_name\": \"X\"}')",
                  kind="probe"),
             step("fails", "import sys; print('bad'); sys.exit(7)"),
             step("skipped", "", skip="for the test")]
    results = gcheck.run_plan(steps, budget_s=60, cwd=tmp_path)
    results[0].figures["nan_value"] = float("nan")  # strict JSON: written as a string
    started = dt.datetime.now(dt.timezone.utc)
    doc = gcheck.make_report(results, started=started, budget_s=60, argv=["--x"], complete=True)
    assert gcheck.validate_report(doc) == []
    path = gcheck.write_report(tmp_path / "results" / "2026-01-01" / "gpu_check.json", doc)
    text = path.read_text()
    back = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert back == gcheck.read_report(path) and gcheck.validate_report(back) == []
    assert back["schema"] == gcheck.SCHEMA and back["complete"] and back["argv"] == ["--x"]
    assert back["cuda_available"] is True and back["machine"]["gpu_name"] == "X"
    assert back["machine"]["nan_value"] == "nan" and not back["ok"]
    assert back["summary"] == {"probe": "passed", "fails": "failed", "skipped": "skipped: for the test"}
    failed = gcheck.StepResult.from_dict(back["steps"][1])
    assert failed.status == "failed" and failed.returncode == 7 and "bad" in failed.tail and failed.duration_s > 0
    assert failed.command.startswith(f"{PY} -c ") and "sys.exit(7)" in failed.command
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_validate_report_finds_problems():
    doc = gcheck.make_report([result("a", "passed", returncode=0)], started=dt.datetime.now(dt.timezone.utc),
                             budget_s=1, argv=[], complete=False)
    assert gcheck.validate_report(doc) == []
    broken = json.loads(json.dumps(doc))
    del broken["machine"]
    broken["steps"][0]["status"] = "great"
    broken["steps"].append(dict(broken["steps"][0], name="b", status="failed", returncode=None))
    problems = gcheck.validate_report(broken)
    assert "missing 'machine'" in problems
    assert any("status 'great'" in p for p in problems)
    assert any("failed without an exit code" in p for p in problems)
    assert "summary: names differ from the steps'" in problems


def test_default_out_path():
    moment = dt.datetime(2026, 12, 24, 23, 59, tzinfo=dt.timezone.utc)
    assert gcheck.default_out_path(moment, root=Path("/r")) == Path("/r/benchmarks/results/2026-12-24/gpu_check.json")
    assert gcheck.repo_root() == ROOT


# ----------------------------------------------------------------------------- main, end to end


@pytest.mark.parametrize("script", ["tools/gpu_check.py", "benchmarks/gpu_check.py"])
def test_runs_before_any_install(script):
    """The tool needs only the standard library (the thin script loads it by path), so --help works without the
    package."""
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([PY, "-S", str(ROOT / script), "--help"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0 and "--budget-s" in out.stdout and "--no-install" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
def test_without_cuda_the_script_says_so_and_exits_0(tmp_path):
    out, copy_dir = tmp_path / "r" / "gpu_check.json", tmp_path / "copy"
    proc = subprocess.run([PY, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out), "--copy-to",
                           str(copy_dir), "--budget-s", "120"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUDA is not available on this machine; no GPU step was run" in proc.stderr
    doc = gcheck.read_report(out)
    assert gcheck.validate_report(doc) == [] and doc == gcheck.read_report(copy_dir / "gpu_check.json")
    assert doc["complete"] and doc["ok"] and doc["cuda_available"] is False
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["cuda_available"] is False
    assert doc["summary"]["probe"] == "passed"
    for entry in doc["steps"][1:]:
        assert entry["status"] == "skipped" and entry["note"] == "CUDA is not available on this machine", entry


def test_a_failed_probe_exits_1(tmp_path, monkeypatch, capsys):
    real = gcheck.build_plan

    def broken_probe(args, **kw):
        steps = real(args, **kw)
        return [dataclasses.replace(steps[0], command=(PY, "-c", "raise SystemExit(2)")), *steps[1:]]

    monkeypatch.setattr(gcheck, "build_plan", broken_probe)
    assert gcheck.main(["--out", str(tmp_path / "g.json"), "--budget-s", "60"]) == 1
    assert "the machine probe failed" in capsys.readouterr().err
    doc = gcheck.read_report(tmp_path / "g.json")
    assert doc["steps"][0]["status"] == "failed" and doc["steps"][0]["returncode"] == 2
    assert doc["cuda_available"] is None and not doc["ok"]
    assert all("could not be confirmed" in s["note"] for s in doc["steps"][1:])
