"""Shared fixtures. Float64 is opt-in per test through the ``x64`` fixture."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test with jax_enable_x64 (for closed-form oracles at 1e-10 precision)."""
  with jax.enable_x64(True):
    yield
