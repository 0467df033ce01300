"""Thin script: `python benchmarks/ort_generate.py --help`; the code is `gaugecompile.bench.ort_generate`."""

import sys

from gaugecompile.bench.ort_generate import main

if __name__ == "__main__":
    sys.exit(main())
