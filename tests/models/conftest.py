"""Fixtures of the model tests."""

import pytest
import torch

from gaugecompile.ops.counters import runs


@pytest.fixture
def fresh_compile():
    """Each test compiles its own model from a clean Dynamo state, with the run-time path counters at zero."""
    torch._dynamo.reset()
    runs.clear()
    yield
    torch._dynamo.reset()
