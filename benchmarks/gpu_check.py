"""Thin script: `python benchmarks/gpu_check.py --help`; the code is `tools/gpu_check.py`.

Unlike the other thin scripts it loads that file by path rather than importing the package: the check is a tool
of the checkout (not installed) that installs the project itself, and before that `import gaugecompile` fails
(the package imports torch and its `gaugecompile.codegen` exists only through the install's package mapping).
The tool needs only the standard library to start.
"""

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(_load().main())
