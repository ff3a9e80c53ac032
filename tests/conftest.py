"""Shared fixtures. Float64 is opt-in per test through the ``x64`` fixture."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test with jax_enable_x64 (for closed-form oracles at 1e-10 precision)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session")
def ksampling():
  """k-diffusion's ``sampling`` module (``benchmarks.k_diffusion_loader``); skips without torch or k-diffusion."""
  pytest.importorskip("torch")
  from benchmarks import k_diffusion_loader

  module = k_diffusion_loader.load_k_diffusion_sampling()
  if module is None:
    pytest.skip("k-diffusion is not installed")
  return module
