"""Sampling throughput over a device mesh: images/s, NFE/s per device, scaling, compile time and compile count.

For each model, solver and NFE budget, txt2img (text encoding, the solver's steps with
classifier-free guidance, VAE decoding for latent models) runs as one jitted program with
the batch sharded over the mesh's data axis and the parameters replicated, on 1, 2, 4, 8
simulated CPU devices (``--devices``) and on the accelerator when one is present.

  python benchmarks/sampler_throughput.py                       # digits, dpmpp_2m + euler, NFE 10, 1/2/4/8 CPUs
  python benchmarks/sampler_throughput.py --models digits,shapes --solvers dpmpp_2m,euler,unipc --nfe 5,10
  python benchmarks/sampler_throughput.py --models sd15 --devices 1,2 --nfe 4 --reps 1   # SD 1.5 at 256 px
  python benchmarks/sampler_throughput.py --json rows.json      # also write the rows

Models (parameters random unless loaded: the throughput does not depend on the values):
  digits  the main job's text-to-image U-Net (configs/default.py), 8x8 grey pixels.
  shapes  the shapes latent diffusion model (configs/shapes_ldm.py): 8x8x4 latents decoded to
          32x32 by its VAE (a random VAE at configs/shapes_vae.py's shapes, exported to a
          temporary folder, stands in for the first stage).
  sd15    the Stable Diffusion 1.5 architecture (CLIP ViT-L/14 text tower, 860M U-Net, SD's VAE),
          built in memory, ``--sd15_size`` px (default 256: 32x32 latents), a byte-level stand-in
          tokenizer padded to 77 tokens like CLIP's.
``--workdir DIR`` samples a trained digits or shapes run (its config.json and latest EMA
checkpoint); ``--sd15_folder DIR`` a diffusers SD folder.

Every (platform, model, device count) runs in child processes: the simulated CPU devices
need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax is imported. The first
child starts on an empty persistent compilation cache ("cold"), the second on the cache the
first filled ("warm"); each program's compile time is its first call minus a steady call.
Each program is called over a sweep of guidance scales x seeds (both traced arguments) and
its compilations are counted with ``jax.monitoring`` (XLA compilations or cache loads of the
sampler): the benchmark exits with status 1 unless every count is 1.

Scaling, per (platform, model, solver, NFE), against the smallest device count n0 measured:
strong = fixed global batch (``--batch`` x the largest device count), efficiency
t(n0) n0 / (n t(n)); weak = fixed per-device batch (``--batch``), efficiency t(n0) / t(n),
t the median seconds per call.

Several processes (``jax.distributed``): run the same command in every process with
``--coordinator_address HOST:PORT --num_processes P --process_id I``; ``--devices`` are then
the devices per process (the mesh spans P x N), each process feeds its slice of every global
batch (``jax.make_array_from_process_local_data``), times are the slowest process's, and only
process 0 prints. All processes should share one ``--cache_dir`` (only process 0 writes JAX's
persistent cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout, uninstalled
from benchmarks.results import output_path  # noqa: E402
from diffjax.convert.files import write_json  # noqa: E402

ROW_MARK = "SAMPLER_THROUGHPUT_ROW "  # a child's result lines on stdout start with this
MODELS = ("digits", "shapes", "sd15")
DEFAULT_BATCH = {"digits": 8, "shapes": 8, "sd15": 1}  # per device
SD15_PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, dramatic light"
SD15_PARAM_GIB = 4.0  # float32 U-Net + VAE + text encoder: one replica per simulated CPU device
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


# ----------------------------------------------------------------------------------------------------------------------
# Child: one platform, model and device count; prints one JSON row per (solver, NFE, global batch).
# ----------------------------------------------------------------------------------------------------------------------
def random_params(abstract, seed: int):
  """numpy parameters for a tree of shapes: normal kernels scaled by 1/sqrt(fan-in), embeddings 0.02, norm scales 1,
  biases 0 (activations stay of order one through a deep random network)."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(s.shape, s.dtype)
    if name == "bias" or len(s.shape) < 2:
      return np.zeros(s.shape, s.dtype)
    std = 0.02 if name == "embedding" else 1.0 / math.sqrt(math.prod(s.shape[:-1]))
    return (std * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def replicate(tree, sharding):
  """Every leaf as a global array with ``sharding`` (numpy leaves on every process, device arrays as the trainer
  puts its frozen parameters)."""
  import jax
  import numpy as np

  def put(a):
    if isinstance(a, np.ndarray):
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
    return jax.device_put(a, sharding)

  return jax.tree.map(put, tree)


class Model(NamedTuple):
  """What a child samples (built by ``trainer_model`` or ``sd15_model``)."""

  program: Callable  # (plan, in_shardings, out_shardings) -> jitted sample_fn(params, ids, mask, key, ts, scale)
  plan: Callable  # (solver, nfe, grid) -> pipelines.Plan
  params: Any  # what sample_fn takes, replicated over the mesh
  rows: Callable  # prompts -> (ids, mask), numpy (B, L)
  prompts: list  # cycled through a batch
  grid: str  # the default time grid
  note: str  # where the parameters come from


def _trainer_config(name: str, workdir: str):
  """The model's config: the workdir's config.json when sampling a trained run, else the config file's defaults."""
  import ml_collections

  from diffjax.train import trainer

  if workdir:
    path = os.path.join(workdir, trainer.CONFIG_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--workdir {workdir}: no {trainer.CONFIG_FILE} (a diffjax training workdir has one)")
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  from configs import default, shapes_ldm

  return (default if name == "digits" else shapes_ldm).get_config()


def _random_shapes_vae(folder: str, seed: int) -> None:
  """A random autoencoder at configs/shapes_vae.py's shapes exported as the shapes LDM's first stage."""
  import flax
  import jax
  import jax.numpy as jnp

  from configs import shapes_vae
  from diffjax.convert import save_pretrained
  from diffjax.train import latent, vae_trainer

  config = shapes_vae.get_config()
  vae = vae_trainer.build_components(config).vae
  size, channels = config.data.image_size, config.data.channels
  abstract = flax.linen.meta.unbox(jax.eval_shape(
      lambda: vae.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))["params"]))
  save_pretrained(vae, random_params(abstract, seed), os.path.join(folder, latent.VAE_FOLDER))


def trainer_model(name: str, args, replicated) -> Model:
  """digits or shapes through the trainer: ``trainer.make_sample_fn`` of its components, the plan of
  ``trainer.sample_plan`` (the config's sampler with the solver and NFE swapped)."""
  import numpy as np

  from diffjax.train import trainer

  config = _trainer_config(name, args.workdir)
  if args.workdir:
    c, (trained, frozen), step = trainer.load_components(config, args.workdir)
    note = f"EMA weights of step {step} of {args.workdir}"
  else:
    if name == "shapes":  # the first stage is read from a folder: export a random one
      config.vae.workdir = tempfile.mkdtemp(prefix="diffjax_throughput_vae_")
      _random_shapes_vae(config.vae.workdir, args.seed)
    try:
      c = trainer.build_components(config)
    finally:  # the VAE is in memory now
      if name == "shapes":
        shutil.rmtree(config.vae.workdir, ignore_errors=True)
    trained, frozen = random_params(c.abstract_state.ema_params, args.seed), c.frozen
    note = "random parameters"
  params = (replicate(trained, replicated), replicate(frozen, replicated) if frozen is not None else None)

  def program(plan, in_shardings, out_shardings):
    return trainer.make_sample_fn(c, plan, in_shardings=in_shardings, out_shardings=out_shardings)

  def rows(prompts):
    r = np.stack([c.tokenize(p) for p in prompts])  # (B, 2, L): ids and mask
    return r[:, 0], r[:, 1]

  def plan(solver, nfe, grid):
    return trainer.sample_plan(_with_sampler(config, solver, nfe, grid), c.spec.process)

  return Model(program, plan, params, rows, list(config.prompts), config.sampler.grid, note)


def _with_sampler(config, solver: str, nfe: int, grid: str):
  """A copy of ``config`` whose sampler is ``solver`` on ``grid`` within ``nfe`` evaluations."""
  config = config.copy_and_resolve_references()
  config.sampler.name, config.sampler.nfe, config.sampler.grid = solver, nfe, grid
  return config


def _sd15_tokenizer():
  """A CLIP tokenizer whose vocabulary is the 256 byte symbols (plain and word-final) and the two specials: SD 1.5's
  sequence length and special ids' roles, no merges (each character one token; the token count does not change the
  cost, the sequence is padded to 77)."""
  from diffjax.models.tokenizers import CLIPTokenizer, bytes_to_unicode

  symbols = list(bytes_to_unicode().values())
  vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
  vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
  return CLIPTokenizer(vocab, [], max_length=77)


def sd15_model(args, replicated) -> Model:
  """The SD 1.5 pipeline (``pipelines.stable_diffusion.assemble``) with random parameters, or ``--sd15_folder``'s;
  its program mirrors ``trainer.make_sample_fn``: noise from the key's first half, ``pipelines.txt2img`` against
  the empty prompt, decoded."""
  import flax
  import jax
  import jax.numpy as jnp

  from benchmarks.generation import SD15_SCHEDULER
  from diffjax import pipelines
  from diffjax.models.text import CLIP_TEXT_CONFIGS, CLIPTextTransformer
  from diffjax.models.unet import UNET_CONFIGS, UNet
  from diffjax.models.vae import VAE_CONFIGS, AutoencoderKL
  from diffjax.pipelines import stable_diffusion
  from diffjax.pipelines.schedulers import DiffusersScheduler

  if args.sd15_folder:
    pipe, params = pipelines.from_pretrained(args.sd15_folder)
    note = f"weights of {args.sd15_folder}"
  else:
    unet, vae = UNet(UNET_CONFIGS["sd15"]), AutoencoderKL(VAE_CONFIGS["sd"])
    text = CLIPTextTransformer(CLIP_TEXT_CONFIGS["sd15"])
    scheduler = DiffusersScheduler.from_config({"_class_name": "PNDMScheduler"} | SD15_SCHEDULER)
    pipe = stable_diffusion.assemble(unet, vae, text, _sd15_tokenizer(), scheduler, where="random SD 1.5")
    key, z = jax.random.key(0), jnp.zeros
    abstract = flax.linen.meta.unbox(jax.eval_shape(lambda: {
        "unet": unet.init(key, z((1, 8, 8, 4)), z((1,)), z((1, 77, 768)))["params"],
        "vae": vae.init(key, z((1, 16, 16, 3)))["params"],
        "text_encoder": text.init(key, z((1, 77), jnp.int32))["params"]}))
    params = random_params(abstract, args.seed)
    note = "random parameters"
  latent_shape = pipe.latent_shape(args.sd15_size, args.sd15_size)
  null_ids, null_mask = (jnp.asarray(a) for a in pipe.tokenize([""]))

  def program(plan, in_shardings, out_shardings):
    def sample_fn(params, ids, mask, key, ts, guidance_scale):
      k_init, k_solver = jax.random.split(key)
      noise = jax.random.normal(k_init, ids.shape[:1] + latent_shape)
      return pipelines.txt2img(pipe, params, ids, mask, null_ids, null_mask, noise, ts, guidance_scale, k_solver,
                               solver=plan.solver, init_scale=plan.init_scale, denoise_final=plan.denoise_final)

    return jax.jit(sample_fn, in_shardings=in_shardings, out_shardings=out_shardings)

  plan = lambda solver, nfe, grid: pipelines.plan_for(pipe, nfe, sampler=solver, grid=grid)
  return Model(program, plan, replicate(params, replicated), pipe.tokenize, [SD15_PROMPT], "karras", note)


class CompileCounter:
  """Counts what ``jax.monitoring`` reports for one function name: traces, and XLA compilations (a load from the
  persistent cache counts as one: both go through JAX's backend-compile step); and the persistent cache's hits
  (of any function: only the sampler compiles while counting)."""

  def __init__(self, fun_name: str):
    from jax import monitoring

    self.fun_name = fun_name
    self.reset()
    monitoring.register_event_duration_secs_listener(self._duration)
    monitoring.register_event_listener(self._event)

  def _duration(self, event: str, duration: float, **kwargs) -> None:
    name = kwargs.get("fun_name")
    if event == "/jax/core/compile/jaxpr_trace_duration" and name == self.fun_name:
      self.traces += 1
    elif event == "/jax/core/compile/backend_compile_duration" and name == f"jit({self.fun_name})":
      self.compiles += 1
      self.compile_s += duration

  def _event(self, event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
      self.cache_hits += 1

  def reset(self) -> None:
    self.traces, self.compiles, self.compile_s, self.cache_hits = 0, 0, 0.0, 0


def mesh_devices(per_process: int):
  """The first ``per_process`` devices of every process (all of them for simulated CPUs)."""
  import jax

  by_process: dict[int, list] = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  if any(len(ds) < per_process for ds in by_process.values()):
    raise ValueError(f"--num_devices {per_process}: a process has only {min(map(len, by_process.values()))} devices")
  return [d for p in sorted(by_process) for d in by_process[p][:per_process]]


def count_collectives(hlo_text: str) -> dict:
  """Collective operations in a compiled program's HLO text (async pairs counted once)."""
  import re

  return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo_text)) for op in COLLECTIVES}


def measure(model: Model, fn, counter: CompileCounter, batch, ts, sweep: list, reps: int, sync) -> dict:
  """First call, ``reps`` timed steady calls and the rest of the guidance-scale x seed sweep; compile counts."""
  import jax
  import numpy as np

  params, (ids, mask) = model.params, batch
  keys = [jax.random.key(seed) for _, seed in sweep]  # made before counting (jax.random.key compiles on first use)
  # the sweep's points in turn, as many as the first call and the timed ones need (the whole sweep at least)
  calls = [(sweep[i % len(sweep)][0], keys[i % len(sweep)]) for i in range(max(1 + reps, len(sweep)))]
  sync("start")
  counter.reset()
  times = []
  for scale, key in calls:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(params, ids, mask, key, ts, scale))
    times.append(time.perf_counter() - t0)
  counts = {"compilations": counter.compiles, "traces": counter.traces, "jit_cache_size": fn._cache_size(),
            "backend_compile_s": counter.compile_s, "cache_hits": counter.cache_hits}
  first, steady = times[0], times[1:1 + reps]
  finite = all(bool(np.isfinite(np.asarray(s.data)).all()) for s in out.addressable_shards)
  collectives = count_collectives(fn.lower(params, ids, mask, keys[0], ts, sweep[0][0]).compile().as_text())
  return {"first_s": first, "steady_s": steady, "finite": finite, "collectives": collectives,
          "image_shape": list(out.shape[1:])} | counts


def child_main(args) -> None:
  """Runs every (solver, NFE, global batch) program of one platform, model and device count; process 0 prints rows."""
  import jax

  jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

  from diffjax.samplers import num_evaluations
  from diffjax.train import trainer

  devices = mesh_devices(args.num_devices)
  # The trainer's ('data', 'fsdp') mesh with fsdp = 1: the batch split over every device, parameters replicated.
  mesh = Mesh(np.array(devices).reshape(len(devices), 1), trainer.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec(trainer.MESH_AXES))
  multi = jax.process_count() > 1
  sync = (lambda name: multihost_utils.sync_global_devices(name)) if multi else (lambda name: None)

  t0 = time.perf_counter()
  model = sd15_model(args, replicated) if args.model == "sd15" else trainer_model(args.model, args, replicated)
  setup_s = time.perf_counter() - t0
  counter = CompileCounter("sample_fn")
  sweep = [(float(s), int(seed)) for s in args.scales.split(",") for seed in args.seeds.split(",")]
  p, n_proc = jax.process_index(), jax.process_count()
  for solver in args.solvers.split(","):
    for nfe in (int(k) for k in args.nfe.split(",")):
      plan = model.plan(solver, nfe, args.grid or model.grid)
      ts = jax.numpy.asarray(plan.ts, jax.numpy.float32)
      fn = model.program(plan, (replicated, batch_sharding, batch_sharding, replicated, replicated, replicated),
                         batch_sharding)
      for global_batch in (int(b) for b in args.batches.split(",")):
        if global_batch % len(devices):
          raise ValueError(f"global batch {global_batch} is not a multiple of the {len(devices)} devices")
        per_process = global_batch // n_proc
        prompts = [model.prompts[i % len(model.prompts)] for i in range(p * per_process, (p + 1) * per_process)]
        batch = tuple(jax.make_array_from_process_local_data(batch_sharding, np.asarray(a, np.int32))
                      for a in model.rows(prompts))
        m = measure(model, fn, counter, batch, ts, sweep, args.reps, sync)
        median = statistics.median(m["steady_s"])
        if multi:  # the call ends when the slowest process's shards are done: report the slowest
          mine = [median, m["first_s"], m["compilations"], m["cache_hits"], m["backend_compile_s"]]
          every = multihost_utils.process_allgather(np.asarray(mine, np.float64))
          m["per_process"] = {k: every[:, i].tolist() for i, k in enumerate(
              ("median_s", "first_s", "compilations", "cache_hits", "backend_compile_s"))}
          median, m["first_s"], m["compilations"] = float(every[:, 0].max()), float(every[:, 1].max()), \
              int(every[:, 2].max())
        row = {"platform": args.platform, "device_kind": devices[0].device_kind, "model": args.model,
               "params": model.note, "solver": solver, "nfe": nfe, "grid": args.grid or model.grid,
               "nfe_used": num_evaluations(plan.solver, len(plan.ts), plan.denoise_final),
               "devices": len(devices), "processes": n_proc, "global_batch": global_batch,
               "phase": args.phase, "median_s": median, "compile_s": m["first_s"] - median, "setup_s": setup_s} | m
        if p == 0:
          print(ROW_MARK + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Parent: children per platform, model and device count; efficiencies; the table.
# ----------------------------------------------------------------------------------------------------------------------
def log(args, message: str) -> None:
  """Progress on stderr (process 0 only)."""
  if args.process_id == 0:
    print(f"[sampler_throughput] {message}", file=sys.stderr, flush=True)


def probe_accelerator() -> tuple[str, int, str] | None:
  """(platform, local device count, device kind) of jax's default backend in a fresh process, None if it is the CPU."""
  code = ("import jax, json; d = jax.local_devices(); "
          "print(json.dumps([d[0].platform, len(d), d[0].device_kind]))")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  if out.returncode != 0:
    return None
  platform, count, kind = json.loads(out.stdout.strip().splitlines()[-1])
  return None if platform == "cpu" else (platform, count, kind)


def available_memory_gib() -> float:
  """MemAvailable of /proc/meminfo in GiB (inf where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
  except (OSError, StopIteration):
    return math.inf


def run_child(args, platform: str, model: str, per_process: int, batches: list[int], phase: str,
              cache_dir: str) -> list[dict]:
  """One child process; its rows (raises with the end of its stderr when it fails)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--platform", platform, "--model", model,
         "--num_devices", str(per_process), "--batches", ",".join(map(str, batches)), "--phase", phase,
         "--cache_dir", cache_dir, "--solvers", args.solvers, "--nfe", args.nfe, "--reps", str(args.reps),
         "--scales", args.scales, "--seeds", args.seeds, "--grid", args.grid, "--seed", str(args.seed),
         "--workdir", args.workdir, "--sd15_size", str(args.sd15_size), "--sd15_folder", args.sd15_folder,
         "--coordinator_address", args.coordinator_address, "--num_processes", str(args.num_processes),
         "--process_id", str(args.process_id)]
  env = dict(os.environ)
  if platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags + [
        f"--xla_force_host_platform_device_count={per_process}"])}
  else:
    env.pop("JAX_PLATFORMS", None)
  t0 = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"{platform} {model} {per_process} devices ({phase}) ran past --timeout {args.timeout} s") from e
  if out.returncode != 0:
    raise RuntimeError(f"{platform} {model} {per_process} devices ({phase}) failed (exit {out.returncode}):\n"
                       f"{out.stderr[-4000:]}")
  rows = [json.loads(line[len(ROW_MARK):]) for line in out.stdout.splitlines() if line.startswith(ROW_MARK)]
  log(args, f"{platform} {model}, {per_process * args.num_processes} devices, {phase} cache: "
            f"{len(rows)} programs in {time.perf_counter() - t0:.0f} s")
  return rows


def merge(cold: list[dict], warm: list[dict]) -> list[dict]:
  """One row per program: throughput from the warm child (the cold one's without it), both compile times, the
  largest compile count of the two."""
  key = lambda r: (r["platform"], r["model"], r["solver"], r["nfe"], r["devices"], r["global_batch"])
  warm_by = {key(r): r for r in warm}
  rows = []
  for c in cold:
    w = warm_by.get(key(c))
    r = dict(w or c)
    r["cold_compile_s"], r["warm_compile_s"] = c["compile_s"], (w["compile_s"] if w else None)
    r["compilations"] = max(c["compilations"], w["compilations"] if w else 0)
    r["finite"] = c["finite"] and (w is None or w["finite"])
    r["images_per_s"] = r["global_batch"] / r["median_s"]
    r["nfe_per_s_per_device"] = r["images_per_s"] * r["nfe_used"] / r["devices"]
    r.pop("phase")
    r.pop("compile_s")
    rows.append(r)
  return rows


def add_efficiencies(rows: list[dict], per_device: dict, strong: dict) -> None:
  """strong_efficiency on rows of the fixed global batch, weak_efficiency on rows of the fixed per-device batch,
  both against the smallest device count of the same (platform, model, solver, NFE)."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["platform"], r["model"], r["solver"], r["nfe"]), []).append(r)
  for (platform, model, _, _), group in groups.items():
    b, s = per_device[(platform, model)], strong[(platform, model)]
    n0 = min(r["devices"] for r in group)
    base_strong = next((r for r in group if r["devices"] == n0 and r["global_batch"] == s), None)
    base_weak = next((r for r in group if r["devices"] == n0 and r["global_batch"] == b * n0), None)
    for r in group:
      r["strong_efficiency"] = r["weak_efficiency"] = None
      if base_strong and r["global_batch"] == s:
        r["strong_efficiency"] = base_strong["median_s"] * n0 / (r["devices"] * r["median_s"])
      if base_weak and r["global_batch"] == b * r["devices"]:
        r["weak_efficiency"] = base_weak["median_s"] / r["median_s"]


def _fmt(v, spec: str) -> str:
  """``v`` formatted, "-" for None."""
  return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
  """The markdown table of the rows."""
  head = ["platform", "model", "solver", "NFE", "devices", "global batch", "images/s", "NFE/s per device",
          "strong eff.", "weak eff.", "cold compile s", "warm compile s", "compilations", "collectives"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    comm = sum(r["collectives"].values())
    cells = [r["platform"], r["model"], r["solver"], str(r["nfe_used"]) + ("" if r["nfe_used"] == r["nfe"] else "*"),
             str(r["devices"]), str(r["global_batch"]), _fmt(r["images_per_s"], ".4g"),
             _fmt(r["nfe_per_s_per_device"], ".4g"), _fmt(r["strong_efficiency"], ".2f"),
             _fmt(r["weak_efficiency"], ".2f"), _fmt(r["cold_compile_s"], ".1f"), _fmt(r["warm_compile_s"], ".1f"),
             str(r["compilations"]), str(comm)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  """The command line, checked (the hidden flags are what the parent passes to a child)."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="digits", help=f"comma-separated, of {', '.join(MODELS)}")
  parser.add_argument("--solvers", default="dpmpp_2m,euler", help="diffjax.samplers.SOLVERS names (fixed-step)")
  parser.add_argument("--nfe", default="10", help="evaluation budgets (the largest grid within each)")
  parser.add_argument("--grid", default="", help="time grid (default: the config's for digits/shapes, karras for SD)")
  parser.add_argument("--devices", default="1,2,4,8", help="simulated CPU devices (per process); the accelerator "
                      "runs those of these counts it has")
  parser.add_argument("--batch", type=int, default=0, help="per-device batch (weak scaling; strong scaling: this x "
                      "the largest device count); default digits 8, shapes 8, sd15 1")
  parser.add_argument("--reps", type=int, default=3, help="timed steady calls per program")
  parser.add_argument("--scales", default="1,3,7.5", help="guidance scales of the compile-count sweep")
  parser.add_argument("--seeds", default="0,1", help="seeds of the compile-count sweep")
  parser.add_argument("--platforms", default="auto", help="cpu, accelerator, or auto (cpu and any accelerator)")
  parser.add_argument("--no_warm", action="store_true", help="skip the warm-cache child (no warm compile time)")
  parser.add_argument("--json", default="", type=output_path, help="also write the rows here")
  parser.add_argument("--cache_dir", default="", help="persistent compilation caches go under this folder (emptied "
                      "per point; default: a temporary folder, with several processes one named by the port)")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
  parser.add_argument("--seed", type=int, default=0, help="random parameters' seed")
  parser.add_argument("--workdir", default="", help="sample this trained digits or shapes run instead")
  parser.add_argument("--sd15_size", type=int, default=256, help="SD 1.5 image size in pixels (latents / 8)")
  parser.add_argument("--sd15_folder", default="", help="a diffusers SD folder instead of random SD 1.5 weights")
  parser.add_argument("--coordinator_address", default="", help="jax.distributed: HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  for name, kind in (("platform", str), ("model", str), ("num_devices", int), ("batches", str), ("phase", str)):
    parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.reps < 1:
    parser.error("--reps must be at least 1 (the steady calls give the time per call)")
  if args.num_processes > 1 and not args.coordinator_address:
    parser.error("--num_processes > 1 needs --coordinator_address HOST:PORT")
  if not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process_id must be in [0, {args.num_processes})")
  unknown = set(args.models.split(",")) - set(MODELS)
  if unknown:
    parser.error(f"unknown models {sorted(unknown)}: choose from {MODELS}")
  if args.workdir and (args.models not in ("digits", "shapes")):
    parser.error("--workdir samples one trained digits or shapes run: give --models digits or --models shapes")
  return args


def main(argv=None) -> int:
  """Runs the children, prints the table (process 0); 1 if a program compiled more than once, else 0."""
  args = parse_args(argv)
  if args.child:
    child_main(args)
    return 0
  from diffjax.samplers import ADAPTIVE_SOLVERS, SOLVERS

  solvers = args.solvers.split(",")
  bad = [s for s in solvers if s not in SOLVERS or s in ADAPTIVE_SOLVERS]
  if bad:
    raise SystemExit(f"--solvers: {bad} are not fixed-step diffjax solvers; available: {sorted(SOLVERS)}")
  platforms = ["cpu", "accelerator"] if args.platforms == "auto" else args.platforms.split(",")
  accel = probe_accelerator() if "accelerator" in platforms else None
  if accel is None and "accelerator" in platforms:
    if args.platforms != "auto":
      raise SystemExit("--platforms accelerator: jax finds no accelerator here")
    platforms.remove("accelerator")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  counts_cpu = [int(n) for n in args.devices.split(",")]
  owned_cache = not args.cache_dir
  cache_root = args.cache_dir or (os.path.join(tempfile.gettempdir(), "diffjax_throughput_cache_"
                                               + args.coordinator_address.replace(":", "_").replace(".", "_"))
                                  if args.num_processes > 1 else tempfile.mkdtemp(prefix="diffjax_throughput_cache_"))
  rows, notes, per_device, strong = [], [], {}, {}
  try:
    for platform in platforms:
      counts = counts_cpu if platform == "cpu" else ([n for n in counts_cpu if n <= accel[1]] or [accel[1]])
      for model in args.models.split(","):
        b = args.batch or DEFAULT_BATCH[model]
        global_counts = [n * args.num_processes for n in counts]
        s = b * math.lcm(*global_counts)
        per_device[(platform, model)], strong[(platform, model)] = b, s
        for n in counts:
          if platform == "cpu" and model == "sd15" and not args.sd15_folder:
            need = n * SD15_PARAM_GIB * 1.25
            if need > available_memory_gib():
              notes.append(f"sd15 on {n} simulated CPU devices skipped: {n} parameter replicas need about "
                           f"{need:.0f} GiB, {available_memory_gib():.0f} GiB available")
              continue
          batches = sorted({b * n * args.num_processes, s})
          cache = os.path.join(cache_root, f"{platform}-{model}-{n}")
          if args.process_id == 0:  # cold: an empty cache (the other processes read what process 0 writes)
            shutil.rmtree(cache, ignore_errors=True)
            os.makedirs(cache)
          cold = run_child(args, platform, model, n, batches, "cold", cache)
          warm = [] if args.no_warm else run_child(args, platform, model, n, batches, "warm", cache)
          rows += merge(cold, warm)
  finally:
    if owned_cache and args.process_id == 0:
      shutil.rmtree(cache_root, ignore_errors=True)
  add_efficiencies(rows, per_device, strong)
  bad_counts = [r for r in rows if r["compilations"] != 1]
  if args.process_id != 0:
    return 1 if bad_counts else 0
  sweep = f"guidance scales {args.scales} x seeds {args.seeds}"
  print(f"sampler throughput: {cores} CPU cores, load average {os.getloadavg()[0]:.2f}; "
        f"{args.num_processes} process(es); median of {args.reps} steady calls; compile counts over {sweep}")
  if accel:
    print(f"accelerator: {accel[1]} x {accel[2]} ({accel[0]})")
  params = sorted({r["params"] for r in rows})
  print(f"parameters: {', '.join(params)} (throughput does not depend on their values)")
  if "cpu" in platforms:
    print(f"NOTE: the simulated CPU devices of a process share its {cores} cores (one device alone already uses all "
          f"of them), so on the CPU the scaling columns measure the cost of splitting the batch over a mesh "
          f"(smaller per-device programs, the collectives, thread contention), not a speedup; an accelerator mesh "
          f"or real hosts show real scaling.")
  for note in notes:
    print(f"NOTE: {note}")
  print()
  print(table(rows))
  print("\nNFE* : the largest grid within the budget uses fewer evaluations. strong eff. = t(n0) n0 / (n t(n)) at "
        "the fixed global batch; weak eff. = t(n0) / t(n) at the fixed per-device batch; n0 the fewest devices. "
        "collectives: all-reduce/all-gather/all-to-all/collective-permute/reduce-scatter ops in the program.")
  if args.json:
    write_json(args.json, {"cores": cores, "load_average": os.getloadavg()[0],
               "num_processes": args.num_processes, "accelerator": accel, "notes": notes,
               "argv": sys.argv[1:] if argv is None else list(argv), "rows": rows}, indent=2)
  if bad_counts:
    print(f"FAIL: {len(bad_counts)} program(s) compiled more than once over the sweep: "
          + ", ".join(f"{r['model']} {r['solver']} NFE {r['nfe']} on {r['devices']} devices, batch "
                      f"{r['global_batch']}: {r['compilations']}" for r in bad_counts))
    return 1
  if not all(r["finite"] for r in rows):
    print("WARNING: some samples are not finite (random parameters can overflow; the timing stands)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
