"""The training loop both trainers share: steps, progress, metrics, checkpoints and preemption.

A preempted job (SIGTERM) saves a checkpoint and stops; rerunning the same command
resumes from it. With one process a Python signal handler notices the SIGTERM. With
several, JAX's preemption sync service does (``jax.distributed.initialize`` starts it):
a SIGTERM to any one process reaches all of them, and all stop after the same step, so
the collective checkpoint save never waits for a process that has left.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """Context manager; ``reached(step)`` is True once the job should save and stop after ``step``.

  Must be asked after every step by every process (the multi-process protocol agrees on the
  first step after the notice that all processes reach).
  """

  def __enter__(self) -> Preemption:
    self._signal = None
    self._previous = None
    if jax.process_count() == 1:  # (several processes: JAX's own SIGTERM handler must stay installed)
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "_signal", signum))
    return self

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signal is not None

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_finite(step: int, diag) -> None:
  """FloatingPointError for a non-finite loss, with what ``steps.train_step``'s diagnostics say about the batch
  (caught before anything is saved)."""
  if not np.isfinite(float(diag["loss"])):
    raise FloatingPointError(
        f"non-finite loss {float(diag['loss'])} at step {step}: batch image mean {float(diag['image_mean']):.4g}, "
        f"std {float(diag['image_std']):.4g}, gradient norm {float(diag['grad_norm']):.4g}; "
        f"per-example losses {np.asarray(diag['per_example_loss'])}")


def train_loop(state, *, train_step: Callable, next_batch: Callable[[], Any], num_steps: int, checkpointer,
               data_iter, writer, log_every: int, checkpoint_every: int,
               check: Callable[[int, Any], None] = lambda step, aux: None, hooks: Iterable[Callable] = ()):
  """Runs steps ``state.step + 1 .. num_steps``; returns (state, last step, preempted).

  Args:
    train_step: ``(state, batch) -> (state, clu metrics Collection, aux)``.
    next_batch: the next global batch (already sharded).
    checkpointer: a ``Checkpointer``; it gets the state and ``data_iter.get_state()`` every
      ``checkpoint_every`` steps, at the end, and on preemption.
    writer: clu metric writer; the merged metrics go to ``train/<name>`` every ``log_every``.
    check: ``check(step, aux)`` raises on a bad step (e.g. a non-finite loss) before anything is saved.
    hooks: clu periodic actions, called with the step after each step.
  """
  metrics, step, preempted = None, int(state.step), False
  bar = tqdm.tqdm(total=num_steps, initial=step, unit="step", desc="training", dynamic_ncols=True, mininterval=1.0,
                  disable=jax.process_index() != 0)  # steps/s and ETA; the loss of the last logged steps
  with Preemption() as preemption, bar:
    try:
      for step in range(int(state.step) + 1, num_steps + 1):
        state, step_metrics, aux = train_step(state, next_batch())
        check(step, aux)
        metrics = step_metrics if metrics is None else metrics.merge(step_metrics)
        for hook in hooks:
          hook(step)
        bar.update(1)
        if step % log_every == 0 or step == num_steps:
          scalars = metrics.compute()
          writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
          if "loss" in scalars:
            bar.set_postfix(loss=f"{float(scalars['loss']):.4g}", refresh=False)
          metrics = None
        preempted = preemption.reached(step)
        if step % checkpoint_every == 0 or step == num_steps or preempted:
          checkpointer.save(step, state, data_iter.get_state())
        if preempted:
          logging.warning("SIGTERM: saved the checkpoint of step %d, stopping", step)
          break
    finally:
      checkpointer.close()
  writer.flush()
  return state, step, preempted
