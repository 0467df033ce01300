"""`python -m gaugecompile.cli`: the same entry as the `gaugecompile` command."""

import sys

from . import main

sys.exit(main())
