"""FSDP sharding from logical-axis rules: 8 simulated devices and 2 processes train like 1 device.

Multi-device runs are subprocesses (``--xla_force_host_platform_device_count``); the
1-device reference runs in the test process. The loss trajectories agree to float32
round-off, not bitwise: a sharded batch mean and the gradient all-reduce / reduce-scatter
sum in another order than one device does (measured: relative differences ~1e-7).
Parameters are compared with an absolute tolerance of a quarter of one Adam step
(``PARAM_ATOL``): where a gradient is ~0, Adam's m / sqrt(v) turns round-off into
steps of either sign (measured: up to 1.3e-4 after 3 steps), while a wrong batch or
sharding moves most parameters by ~lr = 2e-3.

The two training tests compile the U-Net's init and train step once per mesh (about
4 CPU-minutes for the 8-device one on this 2-core machine): they are marked slow,
``python -m pytest -m slow tests/test_sharding.py``. The rule tests are fast.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs import default
from diffjax.train import sharding, trainer
from diffjax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
PARAM_ATOL = 5e-4
# The tiny digits config, smaller still (compilation dominates: three meshes compile init and train_step),
# without its 10-prompt sampling, logging every step. Feature sizes are multiples of 4 = fsdp.
OVERRIDES = {"train.num_steps": STEPS, "train.log_every": 1, "train.checkpoint_every": STEPS, "optim.warmup_steps": 1,
             "prompts": (), "model.channels": (8, 16), "model.norm_groups": 4, "model.text_width": 16,
             "model.num_heads": 2, "model.text_heads": 2, "model.mid_block_attention": False}


def _config(data_dir, **overrides):
  config = default.get_config("tiny")
  for field, value in {**OVERRIDES, "data.data_dir": data_dir, **overrides}.items():
    *sections, key = field.split(".")
    node = config
    for s in sections:
      node = node[s]
    node[key] = value
  return config


def _losses(workdir) -> list[float]:
  """train/loss per step from process 0's TensorBoard events (float32, exact)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"tensors": 0})
  acc.Reload()
  return [float(tensor_util.make_ndarray(e.tensor_proto)) for e in sorted(acc.Tensors("train/loss"),
                                                                          key=lambda e: e.step)]


def _final_state(workdir, config):
  state, _, step = Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(
      trainer.build_components(config).abstract_state)
  assert step == config.train.num_steps
  return state


def _assert_close(reference, other, rtol, atol=0.0):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol),
               reference, other)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The 1-device run of the test config: (data_dir, workdir, losses, final state)."""
  root = tmp_path_factory.mktemp("sharding")
  data_dir, workdir = str(root / "tfds"), str(root / "one_device")
  config = _config(data_dir)
  trainer.train_and_evaluate(config, workdir)
  return data_dir, workdir, _losses(workdir), _final_state(workdir, config)


# -- rules -> partition specs (pure) ----------------------------------------------------------
def test_partition_spec_takes_rules_in_order_and_skips_axes_that_do_not_divide():
  rules = (("embed", "fsdp"), ("mlp", "fsdp"))
  mesh = {"data": 2, "fsdp": 4}
  P = jax.sharding.PartitionSpec
  assert sharding.partition_spec(("embed", "mlp"), (32, 64), rules, mesh) == P("fsdp", None)
  # a 1-channel input convolution: 'embed' = 1 does not divide, 'mlp' takes fsdp
  assert sharding.partition_spec(("conv_h", "conv_w", "embed", "mlp"), (3, 3, 1, 16), rules, mesh) == P(
      None, None, None, "fsdp")
  assert sharding.partition_spec(("embed", "mlp"), (6, 10), rules, mesh) == P(None, None)  # neither divides
  assert sharding.partition_spec(("norm",), (16,), rules, mesh) == P(None)  # no rule
  assert sharding.partition_spec(("embed", "mlp"), (32, 64), (("embed", ("data", "fsdp")),), mesh) == P(
      ("data", "fsdp"), None)
  # size-1 mesh axes are left out: fsdp = 1 replicates everything
  assert sharding.partition_spec(("embed", "mlp"), (32, 64), rules, {"data": 8, "fsdp": 1}) == P(None, None)


def test_check_rules_names_what_is_wrong():
  assert sharding.check_rules(trainer.DEFAULT_RULES, trainer.MESH_AXES) is None
  assert "fsdpp" in sharding.check_rules((("embed", "fsdpp"),), trainer.MESH_AXES)
  assert "'emb'" in sharding.check_rules((("emb", "fsdp"),), trainer.MESH_AXES)
  assert "pairs" in sharding.check_rules(("embed",), trainer.MESH_AXES)


def test_optimizer_state_mirrors_parameter_shardings():
  config = default.get_config("tiny")
  config.optim.grad_accum_steps = 2  # MultiSteps: accumulated gradients are parameter-shaped too
  c = trainer.build_components(config)
  mesh = jax.make_mesh((1, 1), trainer.MESH_AXES)
  params_sharding = sharding.param_shardings(c.boxed_params, mesh, trainer.DEFAULT_RULES)
  state = sharding.state_shardings(c.abstract_state, params_sharding, c.tx, mesh)
  assert jax.tree.structure(state) == jax.tree.structure(c.abstract_state)
  assert jax.tree.structure(params_sharding) == jax.tree.structure(c.abstract_state.params)
  n_params = len(jax.tree.leaves(c.abstract_state.params))
  # mu, nu and the accumulated gradients: three parameter-shaped trees in the optimizer state
  assert len(jax.tree.leaves(state.opt_state)) >= 3 * n_params


# -- 8 simulated devices ---------------------------------------------------------------------
_MESH_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from tests.test_sharding import _config
    from diffjax.train import trainer
    assert jax.device_count() == 8, jax.devices()
    data_dir, root = sys.argv[1], sys.argv[2]
    for data, fsdp in [(8, 1), (2, 4)]:
      config = _config(data_dir, **{"mesh.data": data, "mesh.fsdp": fsdp})
      state = trainer.train_and_evaluate(config, f"{root}/mesh_{data}x{fsdp}")
      split = [(jax.tree_util.keystr(path), str(x.sharding.spec), x.shape, x.addressable_shards[0].data.shape)
               for path, x in jax.tree_util.tree_leaves_with_path(state.params) if "fsdp" in str(x.sharding.spec)]
      opt_split = sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state))
      print("RESULT", json.dumps({"mesh": [data, fsdp], "sharded_params": split, "sharded_opt": opt_split,
                                  "num_params": len(jax.tree.leaves(state.params))}), flush=True)
""")


@pytest.mark.slow
def test_fsdp_on_8_devices_trains_like_one_device(reference, tmp_path):
  data_dir, _, ref_losses, ref_state = reference
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _MESH_WORKER, data_dir, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  assert [r["mesh"] for r in results] == [[8, 1], [2, 4]]
  replicated, fsdp = results
  assert replicated["sharded_params"] == [] and replicated["sharded_opt"] == 0
  # with fsdp=4 most parameters are split in 4 along one axis (a few small ones stay replicated)
  assert len(fsdp["sharded_params"]) > fsdp["num_params"] // 2, fsdp
  for path, spec, shape, shard in fsdp["sharded_params"]:
    assert np.prod(shard) * 4 == np.prod(shape), (path, spec, shape, shard)
  assert fsdp["sharded_opt"] >= 2 * len(fsdp["sharded_params"])  # Adam's mu and nu
  assert len(ref_losses) == STEPS
  config = _config(data_dir)
  for data, fsdp in [(8, 1), (2, 4)]:
    workdir = str(tmp_path / f"mesh_{data}x{fsdp}")
    np.testing.assert_allclose(_losses(workdir), ref_losses, rtol=1e-5, err_msg=f"mesh {data}x{fsdp}")
    # a checkpoint written from sharded arrays restores onto one device, close to the 1-device run
    _assert_close(ref_state.params, _final_state(workdir, config).params, rtol=1e-4, atol=PARAM_ATOL)


# -- 2 processes -----------------------------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two_processes(workdir, data_dir, logs, extra=()):
  """Both processes of a 2-process (2 CPU devices each) run of the test config; stderr to ``logs[i]``."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  flags = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in OVERRIDES.items()
           if k != "prompts"]
  return [subprocess.Popen(
      ["timeout", "1500", sys.executable, "-m", "diffjax.main", "--config=configs/default.py:tiny",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.mesh.fsdp=2", *flags, *extra,
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(logs[i], "w"), text=True) for i in range(2)]


def _finish(procs, logs) -> list[str]:
  """Waits for the processes; asserts they succeeded; their stderr."""
  for p in procs:
    p.wait(timeout=1600)
  errs = [open(log).read() for log in logs]
  for p, err in zip(procs, errs, strict=True):
    assert p.returncode == 0, err[-4000:]
  return errs


@pytest.mark.slow
def test_two_processes_train_like_one(reference, tmp_path):
  data_dir, ref_workdir, ref_losses, ref_state = reference
  workdir = str(tmp_path / "two_processes")
  logs = [str(tmp_path / f"process{i}.log") for i in range(2)]
  # with the tiny config's ten prompts: both processes sample (one image and one judged digit per prompt),
  # process 0 writes samples.png and eval.json
  errs = _finish(_launch_two_processes(workdir, data_dir, logs), logs)
  assert "process 1 of 2, 2 local of 4 devices" in errs[1]
  np.testing.assert_allclose(_losses(workdir), ref_losses, rtol=1e-5)
  _assert_close(ref_state.params, _final_state(workdir, _config(data_dir)).params, rtol=1e-4, atol=PARAM_ATOL)
  logged = set(os.listdir(os.path.join(workdir, "tensorboard")))  # process 0's events (and its profile) only
  events = {f for f in logged if f.startswith("events.out")}
  assert len(events) == 1 and logged <= events | {"plugins"}
  assert os.path.exists(os.path.join(workdir, "samples.png")) and os.path.exists(os.path.join(workdir, "eval.json"))
  assert "digit evaluation:" in errs[0] and "digit evaluation:" not in errs[1]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_the_run_resumes(reference, tmp_path):
  """A SIGTERM to process 1 alone (a preempted host): both save the same step and exit cleanly
  (JAX's preemption sync service); rerunning both resumes from it (each process its own
  input position) and ends like the 1-device run."""
  data_dir, _, ref_losses, ref_state = reference
  workdir = str(tmp_path / "preempted")
  logs = [str(tmp_path / f"process{i}.log") for i in range(2)]
  procs = _launch_two_processes(workdir, data_dir, logs, extra=["--config.prompts=()"])
  deadline = time.time() + 900
  while "process 1 of 2" not in open(logs[1]).read():  # SIGTERM once the preemption service is up
    assert time.time() < deadline and procs[1].poll() is None, open(logs[1]).read()[-4000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  errs = _finish(procs, logs)
  stopped = [re.search(r"SIGTERM: saved the checkpoint of step (\d+)", err) for err in errs]
  assert all(stopped), errs[0][-3000:] + errs[1][-3000:]
  step = int(stopped[0].group(1))
  assert step == int(stopped[1].group(1)) and step < STEPS
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved == [step]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(os.path.join(workdir, "checkpoints", str(step), "data")))

  errs = _finish(_launch_two_processes(workdir, data_dir, logs, extra=["--config.prompts=()"]), logs)
  assert all(f"resumed from the checkpoint of step {step}" in err for err in errs)
  np.testing.assert_allclose(_losses(workdir), ref_losses, rtol=1e-5)
  _assert_close(ref_state.params, _final_state(workdir, _config(data_dir)).params, rtol=1e-4, atol=PARAM_ATOL)
