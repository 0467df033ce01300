"""`gaugecompile` command line: inspect, demo, bench, probe. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
_COMMANDS = {
    "inspect": ("gaugecompile.cli.inspect", "show which attention sites the gauge passes rewrite or refuse"),
    "demo": ("gaugecompile.cli.demo", "run the end-to-end demo on a real (default) or random model"),
    "bench": ("gaugecompile.cli.bench", "run the benchmark suite (gaugecompile.bench)"),
    "probe": ("gaugecompile.cli.probe", "attention-geometry probes per layer (gaugecompile.research.geometry)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gaugecompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        sub_parser.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(sub_parser)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            sub_parser.set_defaults(_missing=True)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", False):
        parser.error(f"'{args.command}' is not available in this build")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
