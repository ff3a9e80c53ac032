"""The whole tree is ruff-clean (ruff.toml)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_clean():
  ruff = shutil.which("ruff")
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]')")
  out = subprocess.run([ruff, "check", "--quiet", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout + out.stderr
