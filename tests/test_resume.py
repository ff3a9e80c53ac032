"""An interrupted run (SIGTERM or kill -9) resumes to bitwise the same parameters.

Runs the tiny digits config in subprocesses (six short trainings, several minutes on
2 cores): marked slow, run with ``python -m pytest -m slow tests/test_resume.py``.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from diffjax.train import trainer
from diffjax.train.checkpoint import Checkpointer

STEPS = 30


def _command(workdir, data_dir):
  return [sys.executable, "-m", "diffjax.main", "--config=configs/default.py:tiny", f"--workdir={workdir}",
          f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=5", "--config.train.log_every=5",
          f"--config.data.data_dir={data_dir}", "--config.prompts=()"]


def _final_params(workdir):
  config = default.get_config("tiny")
  config.train.num_steps = STEPS
  abstract = trainer.build_components(config).abstract_state
  state, _, step = Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(abstract)
  assert step == STEPS
  return state


def _wait_for_checkpoint(proc, workdir, timeout=600):
  start = time.time()
  while time.time() - start < timeout:
    ckpt = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.returncode}")
    time.sleep(0.5)
  raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_interrupted_run_resumes_bitwise(tmp_path, sig):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data_dir = str(tmp_path / "tfds")
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  subprocess.run(_command(straight, data_dir), cwd=root, check=True, capture_output=True, timeout=900)

  proc = subprocess.Popen(_command(interrupted, data_dir), cwd=root, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, interrupted)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  if sig == signal.SIGTERM:
    assert proc.returncode == 0 and "SIGTERM: saved the checkpoint of step" in err, err[-2000:]
  steps_before = sorted(int(d) for d in os.listdir(os.path.join(interrupted, "checkpoints")) if d.isdigit())
  assert steps_before and steps_before[-1] < STEPS, "the run was not interrupted before its end"
  subprocess.run(_command(interrupted, data_dir), cwd=root, check=True, capture_output=True, timeout=900)

  a, b = _final_params(straight), _final_params(interrupted)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.ema_params, b.ema_params)
  jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
