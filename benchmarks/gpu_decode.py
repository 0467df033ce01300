"""Thin script: `python benchmarks/gpu_decode.py --help`; the code is `gaugecompile.bench.gpu_decode`."""

import sys

from gaugecompile.bench.gpu_decode import main

if __name__ == "__main__":
    sys.exit(main())
