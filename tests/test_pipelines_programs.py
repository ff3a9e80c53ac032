"""Compiled pipeline programs on disk (diffjax.pipelines.programs): keyed by what decides them, loaded untraced."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import serialize_executable

from diffjax.models.unet import UNET_CONFIGS, UNet
from diffjax.pipelines import programs


def test_fingerprint_changes_with_every_part_that_decides_a_program():
  unet = UNet(UNET_CONFIGS["sd15"])
  base = programs.fingerprint("sd", unet, np.arange(4.0), jnp.float32, ("dpmpp_2m", (("order", 2),)))
  assert programs.fingerprint("sd", UNet(UNET_CONFIGS["sd15"]), np.arange(4.0), jnp.float32,
                              ("dpmpp_2m", (("order", 2),))) == base  # equal parts, equal prints
  heads = UNet(dataclasses.replace(UNET_CONFIGS["sd15"], num_heads=4))  # same parameter shapes
  changed = [
      programs.fingerprint("sd", heads, np.arange(4.0), jnp.float32, ("dpmpp_2m", (("order", 2),))),
      programs.fingerprint("sd", unet.clone(dtype=jnp.bfloat16), np.arange(4.0), jnp.float32,
                           ("dpmpp_2m", (("order", 2),))),
      programs.fingerprint("sd", unet, np.arange(4.0) + np.array([0, 0, 0, 1e-7]), jnp.float32,
                           ("dpmpp_2m", (("order", 2),))),
      programs.fingerprint("sd", unet, np.arange(4.0), jnp.bfloat16, ("dpmpp_2m", (("order", 2),))),
      programs.fingerprint("sd", unet, np.arange(4.0), jnp.float32, ("dpmpp_2m", (("order", 3),))),
  ]
  assert len(set(changed + [base])) == len(changed) + 1
  with pytest.raises(TypeError, match="cannot fingerprint"):
    programs.fingerprint(lambda x: x)  # an anonymous function has no stable description


def _counted(traces: list):
  def f(x, scale, *, shift):
    traces.append(x.shape)
    return {"y": jnp.sin(x) * scale + shift}
  return f


def _assert_sin(y, x, scale, shift):
  # float32 sin within a few ulp, one product and one sum: 8 ulp of the largest value (< 4) bounds it
  want = np.sin(np.asarray(x, np.float64)) * scale + shift
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0, atol=8 * 2.0**-22)


def test_a_program_is_loaded_from_disk_without_tracing(tmp_path, monkeypatch):
  monkeypatch.setattr(programs, "_folder", lambda: str(tmp_path))
  traces = []
  x, args = jnp.linspace(0.0, 1.0, 6), dict(shift=jnp.float32(0.5))
  first = programs.Program(_counted(traces), key="k")(x, jnp.float32(2.0), **args)["y"]
  assert len(traces) == 1 and len(list(tmp_path.glob("*.pkl"))) == 1
  # A new Program (as in a new process) with the same key and shapes: loaded, not traced.
  again = programs.Program(_counted(traces), key="k")(x, jnp.float32(3.0), **args)["y"]
  assert len(traces) == 1
  _assert_sin(again, x, 3.0, 0.5)
  _assert_sin(first, x, 2.0, 0.5)
  # Other shapes or another key: another executable.
  programs.Program(_counted(traces), key="k")(jnp.ones(3), jnp.float32(2.0), **args)
  programs.Program(_counted(traces), key="other")(x, jnp.float32(2.0), **args)
  assert len(traces) == 3 and len(list(tmp_path.glob("*.pkl"))) == 3
  # No key (a pipeline without a fingerprint): plain jit, nothing stored.
  programs.Program(_counted(traces), key=None)(x * 2, jnp.float32(2.0), **args)
  assert len(traces) == 4 and len(list(tmp_path.glob("*.pkl"))) == 3


def test_preload_reads_the_most_recently_used_programs_ahead(tmp_path, monkeypatch):
  monkeypatch.setattr(programs, "_folder", lambda: str(tmp_path))
  monkeypatch.setenv(programs.READ_AHEAD, "1")
  monkeypatch.setattr(programs, "_preloaded", {})
  traces, files = [], {}
  for n in (3, 4, 5):  # three programs (three shapes), stored at distinct times: 5 most recently
    programs.Program(_counted(traces), key="k")(jnp.arange(float(n)), jnp.float32(2.0), shift=jnp.float32(0.0))
    (files[n],) = set(tmp_path.glob("*.pkl")) - set(files.values())
    os.utime(files[n], (1000.0 + n, 1000.0 + n))
  assert programs.preload(limit=2) == 2
  assert set(programs._preloaded) == {str(files[4]), str(files[5])}
  for future in programs._preloaded.values():
    future.result()
  files[4].unlink(), files[5].unlink()  # read ahead: the files are no longer needed

  def no_compiling(lowered):
    raise AssertionError("compiled a program that was read ahead or stored")

  monkeypatch.setattr(programs, "_compile_bypassing_jax_cache", no_compiling)
  for n in (3, 4, 5):  # 4 and 5 from memory, 3 from its file (not read ahead)
    y = programs.Program(_counted(traces), key="k")(jnp.arange(float(n)), jnp.float32(2.0), shift=jnp.float32(0.0))
    _assert_sin(y["y"], jnp.arange(float(n)), 2.0, 0.0)
  assert len(traces) == 3 and not programs._preloaded
  assert os.path.getmtime(files[3]) > 1003.0  # marked as used: the next preload picks it first
  assert programs.preload(limit=0) == 0


def test_a_damaged_program_file_is_compiled_again_and_replaced(tmp_path, monkeypatch):
  monkeypatch.setattr(programs, "_folder", lambda: str(tmp_path))
  traces = []
  x = jnp.arange(5.0)
  programs.Program(_counted(traces), key="k")(x, jnp.float32(2.0), shift=jnp.float32(0.0))
  (path,) = tmp_path.glob("*.pkl")
  path.write_bytes(path.read_bytes()[:100])  # a truncated write
  monkeypatch.setattr(programs, "_preloaded", {})
  assert programs.preload() == 0  # off by default
  monkeypatch.setenv(programs.READ_AHEAD, "1")
  assert programs.preload() == 1  # read ahead, it fails in the background and is reported when needed
  y = programs.Program(_counted(traces), key="k")(x, jnp.float32(2.0), shift=jnp.float32(0.0))["y"]
  assert len(traces) == 2
  _assert_sin(y, x, 2.0, 0.0)
  programs.Program(_counted(traces), key="k")(x, jnp.float32(2.0), shift=jnp.float32(0.0))
  assert len(traces) == 2  # the replaced file loads


_CACHED_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from diffjax.pipelines import programs

def f(x, y):
  z = jnp.concatenate([x, y]) + 1.0
  return jnp.sin(z) @ z.T @ z + jnp.cumsum(z, 0)

x, y = jnp.ones((64, 64)), jnp.full((32, 64), 0.5)
if sys.argv[2] == "jit":
  run = jax.jit(f)
elif sys.argv[2] == "program":
  run = programs.Program(f, key="concat")
else:  # all in one process: JAX compiles and caches it, a Program compiles (and stores) it, another loads it
  jax.jit(f)(x, y)
  programs.Program(f, key="concat")(x, y)
  run = programs.Program(f, key="concat")
np.save(sys.argv[3], np.asarray(run(x, y)))
"""


@pytest.mark.parametrize("processes", ["three", "one"])
def test_a_program_jax_had_cached_is_stored_whole(tmp_path, processes):
  # jaxlib 0.10.2 serializes an executable that JAX's persistent cache loaded without some kernels; the stored copy
  # then fails when it runs ("Function concatenate.1_kernel not found"). Programs compile with JAX's cache bypassed,
  # also after JAX has decided (once per process) that its cache is in use: the "one" process case.
  script, cache = tmp_path / "run.py", str(tmp_path / "cache")
  script.write_text(_CACHED_SCRIPT)
  steps = ("jit", "program", "program") if processes == "three" else ("jit", "all")
  for i, how in enumerate(steps):
    subprocess.run([sys.executable, str(script), cache, how, str(tmp_path / f"{i}.npy")], check=True,
                   env=os.environ | {programs.ENABLE: "1"})
  assert len(list(pathlib.Path(cache, programs.FOLDER).glob("*/*.pkl"))) == 1  # one environment, one program
  np.testing.assert_array_equal(np.load(tmp_path / f"{len(steps) - 1}.npy"), np.load(tmp_path / "0.npy"))


def test_a_folder_pipeline_reloads_its_programs_and_a_changed_folder_does_not(tmp_path, monkeypatch):
  pytest.importorskip("diffusers")
  from test_pipelines_parity import PROMPTS, SIZE, _tiny_pipeline

  from diffjax import pipelines

  monkeypatch.setattr(programs, "_folder", lambda: str(tmp_path / "programs"))
  folder = _tiny_pipeline(tmp_path, "ddim")[1]
  loads = []
  real = serialize_executable.deserialize_and_load
  monkeypatch.setattr(serialize_executable, "deserialize_and_load", lambda *a, **k: loads.append(1) or real(*a, **k))

  def run(pipe, params):
    return pipelines.generate(pipe, params, PROMPTS, height=SIZE, width=SIZE, plan=pipelines.plan_for(pipe, 3)).images

  monkeypatch.setattr(programs, "_preloaded", {})
  pipe, params = pipelines.from_pretrained(folder)
  first = run(pipe, params)
  assert not loads and len(list((tmp_path / "programs").glob("*.pkl"))) == 2  # txt2img and the decoder
  pipe_again, params = pipelines.from_pretrained(folder)  # a new pipeline object: as in a new process
  assert pipe_again.fingerprint == pipe.fingerprint
  np.testing.assert_array_equal(run(pipe_again, params), first)
  assert len(loads) == 2

  changed = tmp_path / "changed"
  shutil.copytree(folder, changed)
  config = json.loads((changed / "scheduler" / "scheduler_config.json").read_text())
  config["beta_end"] = 0.013  # the same parameters, another process: another program
  (changed / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
  pipe_changed, params = pipelines.from_pretrained(changed)
  assert pipe_changed.fingerprint != pipe.fingerprint
  assert np.abs(run(pipe_changed, params) - first).max() > 1e-4
  assert len(list((tmp_path / "programs").glob("*.pkl"))) == 4  # compiled and stored beside the others
