"""`gaugecompile bench`: the benchmark suite of `benchmarks/run.py` (needs a source checkout)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

_RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _suite():
    if not _RUN.is_file():
        raise FileNotFoundError(f"benchmarks/run.py not found next to the package ({_RUN}); run from a source checkout")
    spec = importlib.util.spec_from_file_location("gaugecompile_benchmarks_run", _RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (random Llama unless --model)")
    parser.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    parser.add_argument("--only", type=int, nargs="+", choices=range(1, 8), metavar="N",
                        help="run only these scenarios (1-7)")
    from .models import add_model_arguments

    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return _suite().main(args=args)
