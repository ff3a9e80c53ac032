"""Shared fixtures. Float64 is opt-in per test through the ``x64`` fixture.

The session shares one persistent XLA compilation cache (a temporary folder, removed at exit):
tests that build the same program again (the tiny pipelines of the parity, generation and
job tests) load it instead of compiling. ``DIFFJAX_TEST_XLA_CACHE=0`` turns it off. JAX's in-memory
caches are cleared after each test module (``_release_compiled_programs``).
"""

import atexit
import gc
import os
import shutil
import tempfile

import jax
import pytest

if os.environ.get("DIFFJAX_TEST_XLA_CACHE", "1") != "0":
  # The first process to import this file (pytest itself, or the xdist controller) makes the folder and removes
  # it at exit; xdist workers inherit the path through the environment and share it.
  _CACHE = os.environ.get("DIFFJAX_TEST_XLA_CACHE_DIR")
  if _CACHE is None:
    _CACHE = os.environ["DIFFJAX_TEST_XLA_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffjax-tests-xla-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # programs worth the disk write


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module (``jax.clear_caches``): the suite runs in one process,
  where the executables of every module otherwise pile up; a later module that builds the same program loads it
  from the persistent cache above."""
  yield
  jax.clear_caches()
  gc.collect()


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
