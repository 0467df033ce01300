"""Thin script: `python benchmarks/run.py --help`; the code is `gaugecompile.bench.suite`."""

import sys

from gaugecompile.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
