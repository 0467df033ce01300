"""Thin script: `python benchmarks/gpu_check.py --help`; the code is `gaugecompile.bench.gpu_check`.

Unlike the other thin scripts it loads that module by file path rather than importing the package: the check
installs the project itself, and before that `import gaugecompile` fails (the package imports torch and its
`gaugecompile.codegen` exists only through the install's package mapping). The module needs only the standard
library to start.
"""

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "gaugecompile" / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("_gaugecompile_gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(_load().main())
