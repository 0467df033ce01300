"""Thin script: `python benchmarks/op_cpu.py --help`; the code is `gaugecompile.bench.op_cpu`."""

import sys

from gaugecompile.bench.op_cpu import main

if __name__ == "__main__":
    sys.exit(main())
