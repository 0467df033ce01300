"""Thin script: `python benchmarks/doc_reuse.py --help`; the code is `gaugecompile.bench.doc_reuse`."""

import sys

from gaugecompile.bench.doc_reuse import main

if __name__ == "__main__":
    sys.exit(main())
