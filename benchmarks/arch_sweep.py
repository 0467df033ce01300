"""Thin script: `python benchmarks/arch_sweep.py --help`; the code is `gaugecompile.models.sweep`."""

import sys

from gaugecompile.models.sweep import main

if __name__ == "__main__":
    sys.exit(main())
