"""Thin script: `python benchmarks/tp_bytes.py --help`; the code is `gaugecompile.bench.tp_bytes`."""

import sys

from gaugecompile.bench.tp_bytes import main

if __name__ == "__main__":
    sys.exit(main())
