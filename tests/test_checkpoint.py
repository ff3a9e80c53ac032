"""orbax checkpointer: round trip, keep-N, corrupt-newest fallback, no NaN checkpoints."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.train.checkpoint import Checkpointer


def _state(step):
  return {"params": {"w": jnp.full((3, 2), float(step))}, "step": jnp.int32(step),
          "rng": jax.random.key_data(jax.random.key(step))}


def test_round_trip_and_keep_n(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (10, 20, 30):
    ckpt.save(step, _state(step), {"next_index": step})
  ckpt.wait()
  assert ckpt.all_steps() == [20, 30]
  state, data, step = ckpt.restore_latest(_state(0))
  assert step == 30 and data == {"next_index": 30}
  jax.tree.map(np.testing.assert_array_equal, state, _state(30))
  ckpt.close()


def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step), {"next_index": step})
  for root, _, files in os.walk(tmp_path / "2" / "state"):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path):
        with open(path, "wb") as f:
          f.write(b"garbage")
  state, data, step = ckpt.restore_latest(_state(0))
  assert step == 1 and data == {"next_index": 1}
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  assert any("step 2 could not be restored" in r.getMessage() for r in caplog.records)


def test_restore_a_given_step(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"next_index": step})
  state, data, step = ckpt.restore(2, _state(0))
  assert step == 2 and data == {"next_index": 2}
  np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 under .*the steps kept are \[1, 2, 3\]"):
    ckpt.restore(5, _state(0))


def test_no_checkpoint_and_no_nan_checkpoint(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.restore_latest(_state(0)) is None
  bad = _state(1)
  bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.nan)
  with pytest.raises(FloatingPointError, match="NaN"):
    ckpt.save(1, bad)
  ckpt.close()
  assert Checkpointer(str(tmp_path)).all_steps() == []


def test_data_state_is_per_process_and_optional(tmp_path, caplog):
  """Each process saves its own iterator state (grain's handler); a checkpoint without this process's
  state (written by another number of processes) still restores the model state."""
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(1), {"next_index": 7})
  data_dir = tmp_path / "1" / "data"
  assert (data_dir / "process_0-of-1.json").exists()
  os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
  state, data, step = ckpt.restore_latest(_state(0))
  assert step == 1 and data is None
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  assert any("input pipeline position of step 1 could not be restored" in r.getMessage() for r in caplog.records)
  ckpt.close()
