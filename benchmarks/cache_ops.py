"""Thin script: `python benchmarks/cache_ops.py --help`; the code is `gaugecompile.bench.cache_ops`."""

import sys

from gaugecompile.bench.cache_ops import main

if __name__ == "__main__":
    sys.exit(main())
