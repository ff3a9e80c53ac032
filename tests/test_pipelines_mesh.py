"""Pipelines on a device mesh: the images split over two (simulated CPU) devices are the one-device images."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Images in [0, 1] after 4 guided steps of the same float32 networks, evaluated on another batch per device
# (another vectorization, so another summation order): the bound the diffusers parity tests hold two
# implementations of the same networks to. A wrong row order or a lost row moves images by O(0.1).
IMAGE_ATOL = 1e-4

# Prepended to each worker: records, for every placement a pipeline call makes with a mesh, over how many devices
# its per-image arrays were split (so a call that ignored ``mesh`` would be seen, not just give the same images).
SPY = textwrap.dedent("""
    import importlib, jax
    # the modules themselves (the package's attributes of these names are its functions)
    _modules = [importlib.import_module(f"diffjax.pipelines.{m}") for m in ("generate", "inpaint", "upscale")]
    SPLIT_OVER, _placed = [], _modules[0].on_mesh
    def _spy(mesh, batch, params, *per_call):
      out = _placed(mesh, batch, params, *per_call)
      if mesh is not None:
        SPLIT_OVER.append(min(len(a.sharding.device_set) for a in jax.tree.leaves(out[1:])
                              if a.ndim and a.shape[0] == batch))
      return out
    for _module in _modules:
      _module.on_mesh = _spy
""")

_WORKER = SPY + textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from diffjax import pipelines
    assert jax.device_count() == 2, jax.devices()
    pipe, params = pipelines.from_pretrained(sys.argv[1])
    mesh = jax.make_mesh((2,), ("data",))
    plan = pipelines.plan_for(pipe, 4)
    prompts, size = ["a red circle", "a blue square"], int(sys.argv[2])
    image = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
    mask = np.zeros((size, size), bool)
    mask[size // 4:, : size // 2] = True
    calls = {
        "txt2img": lambda **kw: pipelines.generate(pipe, params, prompts, height=size, width=size, plan=plan, **kw),
        "img2img": lambda **kw: pipelines.generate(pipe, params, prompts, height=size, width=size, plan=plan,
                                                   image=image, strength=0.75, **kw),
        "inpaint": lambda **kw: pipelines.inpaint(pipe, params, prompts, image, mask, height=size, width=size,
                                                  plan=plan, **kw),
    }
    out = {}
    for task, call in calls.items():
      one, split = call(seed=3), call(seed=3, mesh=mesh)
      split_over = SPLIT_OVER.pop()
      other = call(seed=4, mesh=mesh)
      out[task] = dict(diff=float(np.abs(one.images - split.images).max()), split_over=split_over,
                       seed_diff=float(np.abs(other.images - split.images).max()),
                       row_diff=float(np.abs(split.images[0] - split.images[1]).max()),
                       finite=bool(np.isfinite(split.images).all()), shape=list(split.images.shape))
    try:
      pipelines.generate(pipe, params, prompts + ["a green triangle"], height=size, width=size, plan=plan, mesh=mesh)
    except ValueError as e:
      out["odd_batch_error"] = str(e)
    print(json.dumps(out))
""")


def on_two_devices(code: str, *args) -> dict:
  """Runs ``code`` (which prints one JSON line last) in a process with two simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


def test_generation_on_a_two_device_mesh_matches_one_device(tmp_path):
  pytest.importorskip("diffusers")
  from test_pipelines_parity import SIZE, _tiny_pipeline

  out = on_two_devices(_WORKER, _tiny_pipeline(tmp_path, "ddim")[1], SIZE)
  for task in ("txt2img", "img2img", "inpaint"):
    r = out[task]
    assert r["split_over"] == 2, (task, r)  # the call did split its images over both devices
    assert r["shape"] == [2, SIZE, SIZE, 3] and r["finite"], (task, r)
    assert r["diff"] <= IMAGE_ATOL, (task, r)
    # The comparison can fail: another seed, or the other prompt's row, is far outside the bound.
    assert r["seed_diff"] > 100 * IMAGE_ATOL and r["row_diff"] > 100 * IMAGE_ATOL, (task, r)
  assert "3 images do not split over the mesh's 2 devices" in out["odd_batch_error"]
