"""Test configuration: Triton runs in its CPU interpreter (must be set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.load_profile("ci")
