"""Every script in examples/ runs to exit code 0 on a tiny random model, as a user runs it: `python PATH ...` in a
subprocess, from a working directory outside the checkout.

Most runs use `--inner eager` (the gauge passes without Inductor) so that compile time does not dominate; the
default Inductor path is exercised by `compile_any_model-inductor` (slow: tens of seconds with a cold Inductor
cache). Each case has its own timeout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RANDOM = ["--random", "llama"]
EAGER = ["--inner", "eager"]

# (script, arguments, timeout in seconds)
CASES = [
    pytest.param("compile_any_model.py", [*RANDOM, *EAGER], 300, id="compile_any_model-eager"),
    pytest.param("compile_any_model.py", RANDOM, 600, id="compile_any_model-inductor", marks=pytest.mark.slow),
    pytest.param("beam_search.py", [*RANDOM, *EAGER, "--new-tokens", "6"], 300, id="beam_search",
                 marks=pytest.mark.slow),
    pytest.param("batched_generation.py", [*RANDOM, *EAGER, "--new-tokens", "6"], 300, id="batched_generation"),
    pytest.param("continuous_batching.py", [*RANDOM, *EAGER, "--new-tokens", "6"], 300, id="continuous_batching"),
    pytest.param("streaming.py", [*RANDOM, *EAGER, "--window", "16", "--steps", "32", "--block-size", "4"], 300,
                 id="streaming"),
    pytest.param("document_reuse.py", [*RANDOM, *EAGER, "--new-tokens", "6"], 300, id="document_reuse"),
    pytest.param("onnx_export.py", RANDOM, 300, id="onnx_export"),
    pytest.param("onnx_generate.py", [*RANDOM, "--new-tokens", "6", "--window", "8"], 300, id="onnx_generate"),
    pytest.param("edit_and_generate.py", [*RANDOM, "--new-tokens", "8"], 300, id="edit_and_generate"),
    pytest.param("recompute_spliced.py", RANDOM, 300, id="recompute_spliced"),
    pytest.param("custom_model.py", [*RANDOM, *EAGER], 300, id="custom_model"),  # its own layer: --random ignored
    pytest.param("streaming_llama_code.py", [*RANDOM, *EAGER], 300, id="streaming_llama_code"),  # its own layer too
    pytest.param("geometry_probes.py", RANDOM, 300, id="geometry_probes"),
    pytest.param("learn_positions.py", [*RANDOM, "--steps", "4", "--grid", "0", "8"], 300, id="learn_positions"),
    pytest.param("hybrid_model.py", [], 300, id="hybrid_model"),  # a tiny random Qwen3-Next by default
    pytest.param("tensor_parallel.py", [*RANDOM, "--new-tokens", "6"], 300, id="tensor_parallel"),  # 2 gloo ranks
    pytest.param("low_precision.py", [*RANDOM, "--new-tokens", "6"], 300, id="low_precision-bf16"),
    pytest.param("low_precision.py", [*RANDOM, "--precision", "int8", "--new-tokens", "6"], 300,
                 id="low_precision-int8", marks=pytest.mark.slow),
    pytest.param("compressed_cache.py", [*RANDOM, "--new-tokens", "6"], 300, id="compressed_cache-int8"),
    pytest.param("compressed_cache.py", [*RANDOM, "--kv-dtype", "int4", "--new-tokens", "6"], 300,
                 id="compressed_cache-int4", marks=pytest.mark.slow),
    pytest.param("bayesian_wind_tunnel.py", ["--smoke"], 300, id="bayesian_wind_tunnel"),  # trains its own model
]


def test_every_example_has_a_case():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted({case.values[0] for case in CASES})


@pytest.mark.parametrize(("script", "args", "timeout"), CASES)
def test_example_runs(script: str, args: list[str], timeout: int, tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLES / script), *args]
    try:
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # its partial output may arrive as bytes
        partial = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr)]
        pytest.fail(f"{' '.join(command)} ran past {timeout} s; output so far:\n" + "\n".join(partial))
    output = f"$ {' '.join(command)}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    assert "OK" in result.stdout and "FAIL" not in result.stdout + result.stderr, output
