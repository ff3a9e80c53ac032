"""orbax checkpoints of the training state and the input pipeline position.

One checkpoint per saved step holds two items: ``state`` (any pytree of arrays:
params, EMA params, optimizer state, step, RNG key data) and ``data`` (the grain
iterator state of every process, one JSON file each, written by grain's orbax handler:
``data/process_<i>-of-<n>.json``). Saves are asynchronous, at most ``max_to_keep`` are
kept. Every process of a multi-host job calls ``save`` and ``restore_latest`` (or ``restore`` of one step)
together.

Restoring walks the steps from newest to oldest: a checkpoint that fails to load
(corrupt or half-written) is skipped with a warning, so a crash during a save never
loses the run. ``save`` refuses a state with a non-finite floating-point value.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


def _all_finite(tree) -> bool:
  """Whether every floating-point element of ``tree`` is finite, agreed by all processes.

  Checked with numpy on this process's shards (one copy each; orbax copies them to the
  host for writing anyway) rather than by a jitted reduction: compiling one reduction
  per leaf takes XLA:CPU over 2 minutes for a 1,884-array training state.
  """
  shards = []
  for x in jax.tree.leaves(tree):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      continue
    if isinstance(x, jax.Array):
      shards += [s.data for s in x.addressable_shards if s.replica_id == 0]
    else:
      shards.append(x)
  finite = all(bool(np.isfinite(a).all()) for a in jax.device_get(shards))
  if jax.process_count() > 1:  # one process's NaN stops all of them, and none hangs in the save
    finite = bool(np.all(multihost_utils.process_allgather(np.asarray(finite))))
  return finite


class _DataState:
  """One process's iterator state (a JSON dict) in the form grain's orbax handler saves and restores."""

  def __init__(self, state: dict | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:  # called by the handler after a restore; nothing to prefetch
    pass


class Checkpointer:
  """Saves and restores (state, data_state) under ``directory`` (see module docstring)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._directory = os.fspath(directory)
    self._manager = ocp.CheckpointManager(self._directory, options=options)

  def save(self, step: int, state, data_state: dict | None = None, *, wait: bool = False) -> None:
    """Starts saving ``state`` and ``data_state`` as ``step`` (``wait=True`` blocks until written)."""
    if not _all_finite(state):
      raise FloatingPointError(f"refusing to checkpoint step {step}: the state has a NaN or Inf")
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = grain.checkpoint.CheckpointSave(_DataState(data_state))
    self._manager.save(step, args=ocp.args.Composite(**args), force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore_latest(self, abstract_state) -> tuple[Any, dict | None, int] | None:
    """(state, data_state, step) of the newest loadable checkpoint, or None if there is none.

    Args:
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings, for a
        sharded restore) or arrays with the structure of the saved state. Leaves
        without a sharding are restored onto the first local device, whatever the
        device layout the checkpoint was written from.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore_state(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - any failure to read means: try an older one
        logging.warning("checkpoint at step %d could not be restored (%s: %s); trying an older one", step,
                        type(e).__name__, str(e)[:200])
        continue
      return state, self._restore_data(step), step
    return None

  def restore(self, step: int, abstract_state) -> tuple[Any, dict | None, int]:
    """(state, data_state, step) of the checkpoint of exactly ``step`` (``abstract_state`` as in
    ``restore_latest``); FileNotFoundError naming the steps kept if there is none."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} under {self._directory}: the steps kept are "
                              f"{self.all_steps() or 'none'}")
    return self._restore_state(step, abstract_state), self._restore_data(step), step

  def _restore_state(self, step: int, abstract_state):
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or device),
        jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state))
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    if restored.state is None:
      raise ValueError("empty state")
    return restored.state

  def _restore_data(self, step: int) -> dict | None:
    """This process's iterator state at ``step``; None (with a warning) if it has none, e.g. when the
    checkpoint was written by another number of processes: the model state still resumes."""
    if not os.path.isdir(os.path.join(self._directory, str(step), "data")):
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(_DataState())))
      return restored.data.state
    except Exception as e:  # noqa: BLE001
      logging.warning("the input pipeline position of step %d could not be restored (%s: %s); the data "
                      "iterator starts afresh", step, type(e).__name__, str(e)[:200])
      return None

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
