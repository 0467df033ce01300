"""`gaugecompile bench`: the benchmark suite of `gaugecompile.bench.suite` (installed with the package)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.suite import build_parser

    build_parser(parser)


def run(args: argparse.Namespace) -> int:
    from ..bench.suite import main

    return main(args=args)
