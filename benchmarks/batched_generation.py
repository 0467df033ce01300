"""Thin script: `python benchmarks/batched_generation.py --help`; the code is `gaugecompile.bench.batched`."""

import sys

from gaugecompile.bench.batched import main

if __name__ == "__main__":
    sys.exit(main())
