"""txt2img end to end, diffjax vs diffusers, on the real SD 1.5 or SDXL base architecture with random weights.

One call = text encoding, ``--steps`` sampler steps with classifier-free guidance (the U-Net on a batch of 2B),
VAE decoding, images back on the host. Both sides load the same saved diffusers folder (random weights at the
release's shapes stored in float16, no download: ``make_folder``) and run the same scheduler and steps:
``--arch sd15`` (default): SD 1.5, CLIP ViT-L/14's text tower, SD 1.5's PNDM config; ``--arch sdxl``: SDXL base,
the text towers of CLIP ViT-L/14 and OpenCLIP bigG/14, the 2.6B-parameter U-Net, SDXL's Euler config.

``--precision float32`` (default): both frameworks in float32. ``--precision half``: diffjax's networks and
parameters in bfloat16 (``pipelines.from_pretrained(dtype=, param_dtype=jnp.bfloat16)``; its VAE decodes in
float32 for either architecture); diffusers in float16 on CUDA (``torch_dtype=torch.float16``, attention through
PyTorch's SDPA, ``AttnProcessor2_0``; SDXL's VAE is cast to float32 for each decode (``force_upcast``), SD 1.5's
decodes in float16) and in bfloat16 on a CPU (PyTorch's float16 CPU kernels are incomplete).

Devices: diffusers runs on CUDA when ``torch.cuda.is_available()``, else on all cores
(``torch.set_num_threads(os.cpu_count())``); diffjax on JAX's default backend. Each child reports in its first
answer the device and dtype it ran in (diffusers: device, its U-Net's parameter dtype, attention processor class;
diffjax: backend, device kind and count, its U-Net's parameter dtype): printed above the table, stored per row
in ``--json`` (``ran_on``) beside the top-level ``arch`` and ``precision``; a warning says when one framework ran
on a GPU and the other did not. On a GPU the warm diffjax child and diffusers' hold it together: each diffjax
child preallocates ``GPU_MEMORY_FRACTION`` (45%) of its memory (``XLA_PYTHON_CLIENT_MEM_FRACTION`` where the
environment does not set it), PyTorch takes the rest as it needs.

On a GPU machine, the open issue's check (diffjax's images/s >= 1.2x diffusers' float16 with SDPA):

  python benchmarks/generation.py --arch sd15 --sizes 512 --batches 1,4 --precision half --reps 3
  python benchmarks/generation.py --arch sdxl --sizes 1024 --batches 1,4 --precision half --reps 3

Making the folders (the first run of an arch, into ``<tmp>/diffjax_bench_<arch>``): sd15 1.07B parameters,
2.1 GB in float16, 30 s on a shared 2-core CPU (measured: ``make_folder`` alone, peak RSS 4.4 GB); sdxl 3.47B
parameters (U-Net 2.57B, text towers 0.12B + 0.69B, VAE 0.08B; counted on PyTorch's meta device), 6.9 GB in
float16, peak host memory ~13 GB (the U-Net in float32 before its cast), ~1.5-2 min by the same rate (not
measured). Each point then starts three children that each load the folder (SDXL: 6.9 GB from disk or page
cache) and compile or warm up: a rough guess (nothing was measured on a GPU), 2-4 min of device time per SDXL
point at 10 steps, so the SDXL command may need splitting into one ``--batches`` value per call to fit a
10-minute limit per command.

CPU:

  python benchmarks/generation.py                                  # 256 and 512 px, batch 1 and 4, 10 steps
  python benchmarks/generation.py --sizes 256 --batches 1 --steps 4 --reps 1   # a quick look
  python benchmarks/generation.py --sizes 512 --batches 4 --cpu_devices 2      # the batch over 2 CPU devices

Each framework runs in its own child process, so that peak host memory (``ru_maxrss``) and
start-up costs are each framework's own. For each point: diffjax with an empty persistent
compilation cache ("cold": its first call minus a steady call is compilation); then diffusers
and diffjax on the cache the cold run filled ("warm": first call minus a steady call is the
warm start), both kept alive and called in turn, diffusers then diffjax, ``--reps`` times, so
that the load of a shared host drifting over minutes moves both sides of every pair alike.
Reported per point: seconds per image (median of the steady calls), the diffjax/diffusers
throughput ratio of those medians with the range of the per-pair ratios, cold compile, warm
start, and peak RSS of each process.

``--cpu_devices N`` runs diffjax on N simulated CPU devices (XLA's host-platform device count: partitions
of the same cores, not more hardware) with each batch that N divides split over them
(``pipelines.generate(mesh=)``): on this 2-core CPU two devices ran the SD 1.5 U-Net ~4% faster than one.
It applies to the CPU backend only (a diffjax child on a GPU refuses it).

The tokenizer is a small BPE vocabulary made here in CLIP's format: token ids differ from the real
CLIP vocabulary, which changes no shape and no cost (the sequences are always padded to 77).

The table also reports how long this machine takes to fault in fresh memory (a child process
touching 1 GiB with numpy), before the first point and after each one, with and without numpy's
transparent-huge-page advice. On the virtual machines this was developed on, numpy's
``madvise(MADV_HUGEPAGE)`` on large arrays made first touches cost 3-15 s/GiB (each 2 MiB huge
page faulted in 8-15 ms, counted by ``thp_fault_alloc`` in /proc/vmstat) while 4 KiB pages
cost 0.15-0.5 s/GiB, varying within minutes. The children therefore run with
``NUMPY_MADVISE_HUGEPAGE=0`` (both frameworks; ``--numpy_hugepages`` keeps numpy's default),
and above ``SLOW_FAULTS`` s/GiB for the setting they run with, the script warns that loading
and first calls are dominated by page faults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout, uninstalled
from benchmarks.results import output_path  # noqa: E402
from diffjax.convert.files import write_json  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, dramatic light"
NEGATIVE = "blurry, low quality"
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
SDXL_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
                  "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False}
# Per architecture: the diffusers pipeline class its folder holds, its scheduler class and config.
ARCHS = {"sd15": ("StableDiffusionPipeline", "PNDMScheduler", SD15_SCHEDULER),
         "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", SDXL_SCHEDULER)}
SDXL_TIME_IDS = 6  # SDXL's micro-conditioning: original size, crop top-left, target size


GPU_MEMORY_FRACTION = "0.45"  # of a GPU's memory that a diffjax child preallocates (unless set in the environment)
SLOW_FAULTS = 0.5  # s/GiB of first-touch page faults above which the machine is flagged


def fresh_memory_s_per_gib(env: dict | None = None) -> float:
  """Seconds per GiB that a new process (environment ``env``) takes to allocate and touch 1 GiB with numpy."""
  code = ("import time, numpy as np; t = time.perf_counter(); a = np.ones(2**30, np.uint8); "
          "print(time.perf_counter() - t)")
  return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout)


def child_environment(numpy_hugepages: bool) -> dict:
  """The children's environment: numpy's huge-page advice off unless asked for (see the module docstring)."""
  env = dict(os.environ)
  if not numpy_hugepages:
    env["NUMPY_MADVISE_HUGEPAGE"] = "0"
  return env


def mesh_devices(cpu_devices: int, batch: int) -> int:
  """How many CPU devices diffjax splits a batch over: ``cpu_devices`` where the images divide evenly, else 1."""
  return cpu_devices if batch % cpu_devices == 0 else 1


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def unet_config(arch: str, tiny: bool = False):
  """diffjax's ``UNetConfig`` of ``arch``'s U-Net: the release's, or (``tiny``) the same layout at toy widths.

  sd15: ``UNET_CONFIGS["sd15"]`` (``"tiny"``). sdxl (no entry in ``UNET_CONFIGS``): SDXL base's U-Net, 3 levels
  (320, 640, 1280) with attention on the two lower ones (5, 10, 20 heads of 64, linear projections; 1, 2, 10
  transformer blocks), context width 768 + 1280 (both text towers), "text_time" conditioning on the pooled
  1280-wide text embedding and 6 time ids of 256 features each; tiny: 2 levels of (32, 64) with 1 and 2 transformer
  blocks on the second, context 32 + 32, time ids of 8 features.
  """
  from diffjax.models.unet import UNET_CONFIGS, UNetConfig

  if arch == "sd15":
    return UNET_CONFIGS["tiny" if tiny else "sd15"]
  if tiny:
    return UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(False, True), num_heads=2,
                      transformer_depth=(1, 2), cross_attention_dim=32 + 32, use_linear_projection=True,
                      norm_num_groups=8, addition_time_embed_dim=8, addition_embed_dim=32 + SDXL_TIME_IDS * 8)
  return UNetConfig(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True), num_heads=(5, 10, 20),
                    transformer_depth=(1, 2, 10), cross_attention_dim=768 + 1280, use_linear_projection=True,
                    addition_time_embed_dim=256, addition_embed_dim=1280 + SDXL_TIME_IDS * 256)


def make_folder(folder: str, tiny: bool = False, arch: str = "sd15") -> None:
  """Writes a diffusers pipeline folder of ``arch`` with random weights, stored in float16 (half the disk and
  write time of float32; both frameworks cast on loading): the release's shapes, or (``tiny``) toy widths.

  sd15: a ``StableDiffusionPipeline``: CLIP ViT-L/14's text tower, SD's VAE and U-Net, SD 1.5's PNDM config.
  sdxl: a ``StableDiffusionXLPipeline`` at SDXL base's shapes: CLIP ViT-L/14's text tower (``text_encoder``),
  OpenCLIP bigG/14's with its projection (``text_encoder_2``, a ``CLIPTextModelWithProjection``) whose tokenizer
  pads with "!" as the release's does, SD's VAE with scaling factor 0.13025 and ``force_upcast``, the U-Net of
  ``unet_config("sdxl")``, SDXL's Euler config, ``force_zeros_for_empty_prompt``, no watermarker.
  tiny: a 4-level VAE (8x downsampling, 4 latent channels), ``unet_config(arch, tiny=True)``, 2-layer text towers
  of width 32 (SDXL's second projects to 32).
  """
  import diffusers
  import torch
  import transformers

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from test_tokenizers import CORPUS, write_clip_files

  from diffjax.convert.configs import unet_config_to_diffusers, vae_config_to_diffusers
  from diffjax.models.vae import VAE_CONFIGS, VAEConfig

  pipeline_class, scheduler_class, scheduler_config = ARCHS[arch]
  torch.manual_seed(0)
  tok = os.path.join(folder, "_tokenizer_files")
  os.makedirs(tok, exist_ok=True)
  vocab, files = write_clip_files(tok, CORPUS + [PROMPT, NEGATIVE], 200)
  towers = {  # (hidden, intermediate, layers, heads, activation): CLIP ViT-L/14's text tower, OpenCLIP bigG/14's
      "text_encoder": (32, 64, 2, 4, "quick_gelu") if tiny else (768, 3072, 12, 12, "quick_gelu"),
      "text_encoder_2": (32, 64, 2, 4, "gelu") if tiny else (1280, 5120, 32, 20, "gelu")}

  def half(module):  # each network cast once made: the largest float32 copy alive is one network's
    return module.to(torch.float16)

  def text_tower(name, cls=transformers.CLIPTextModel, **extra):
    hidden, intermediate, layers, heads, act = towers[name]
    return half(cls(transformers.CLIPTextConfig(
        vocab_size=len(vocab) if tiny else 49408, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], **extra)))

  vae_config = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8) if tiny else \
      VAE_CONFIGS["sd"]
  if arch == "sdxl":
    vae_config = dataclasses.replace(vae_config, scaling_factor=0.13025)
  sample = 1024 if arch == "sdxl" else 512  # the release's default image size (config only)
  parts = dict(
      text_encoder=text_tower("text_encoder"),
      tokenizer=transformers.CLIPTokenizer(*files, model_max_length=77),
      vae=half(diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(vae_config, sample_size=sample))),
      unet=half(diffusers.UNet2DConditionModel.from_config(
          unet_config_to_diffusers(unet_config(arch, tiny), sample_size=sample // 8))),
      scheduler=getattr(diffusers, scheduler_class)(**scheduler_config))
  if arch == "sdxl":
    parts.update(text_encoder_2=text_tower("text_encoder_2", transformers.CLIPTextModelWithProjection,
                                           projection_dim=towers["text_encoder_2"][0]),
                 tokenizer_2=transformers.CLIPTokenizer(*files, model_max_length=77, pad_token="!"),
                 force_zeros_for_empty_prompt=True, add_watermarker=False)
  else:
    parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  getattr(diffusers, pipeline_class)(**parts).save_pretrained(folder)


def check_folder_arch(folder: str, arch: str) -> None:
  """Refuses a folder whose model_index.json names another pipeline class than ``arch``'s (naming the file)."""
  path = os.path.join(folder, "model_index.json")
  with open(path) as f:
    name = json.load(f).get("_class_name")
  if name != ARCHS[arch][0]:
    raise SystemExit(f"{path} is a {name} folder, not --arch {arch}'s {ARCHS[arch][0]}: pass --folder for {arch} "
                     f"(or remove the folder to have it made again)")


def _serve(call, load_s: float, ran_on: dict) -> None:
  """The child's side of the protocol: time the first call, report it with ``ran_on`` (device, dtype), then one
  timed call per ``call`` line on stdin until ``quit`` (or end of input), each reported as a JSON line on stdout."""
  t0 = time.perf_counter()
  call()
  print(json.dumps({"load_s": load_s, "first_s": time.perf_counter() - t0} | ran_on), flush=True)
  for line in sys.stdin:
    if line.strip() != "call":
      break
    t0 = time.perf_counter()
    call()
    print(json.dumps({"t": time.perf_counter() - t0}), flush=True)
  print(json.dumps({"peak_rss_gib": _peak_rss_gib()}), flush=True)


def child_diffusers(args) -> None:
  """diffusers' pipeline class of ``--arch`` on CUDA if there is one, else on all CPU cores; ``--precision half``
  is float16 on CUDA and bfloat16 on a CPU (PyTorch's float16 CPU kernels are incomplete)."""
  import diffusers
  import torch

  cuda = torch.cuda.is_available()
  if not cuda:
    torch.set_num_threads(os.cpu_count())
  dtype = torch.float32 if args.precision == "float32" else torch.float16 if cuda else torch.bfloat16
  t0 = time.perf_counter()
  extra = {"safety_checker": None} if args.arch == "sd15" else {}
  pipe = getattr(diffusers, ARCHS[args.arch][0]).from_pretrained(args.folder, torch_dtype=dtype, **extra)
  pipe.to("cuda" if cuda else "cpu")
  pipe.set_progress_bar_config(disable=True)
  load = time.perf_counter() - t0
  ran_on = {"device": f"cuda ({torch.cuda.get_device_name()})" if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "dtype": str(pipe.unet.dtype),
            "attention": ",".join(sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}))}

  def call():
    with torch.no_grad():
      return pipe([PROMPT] * args.batch, negative_prompt=[NEGATIVE] * args.batch, height=args.size, width=args.size,
                  num_inference_steps=args.steps, guidance_scale=7.5, output_type="np").images

  _serve(call, load, ran_on)


def child_diffjax(args) -> None:
  """diffjax on JAX's default backend; ``--precision half``: networks and parameters in bfloat16 (diffjax's loaders
  keep the VAE's computation in float32, as diffusers' ``force_upcast`` does for SDXL)."""
  import jax
  import jax.numpy as jnp

  jax.config.update("jax_compilation_cache_dir", args.cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from diffjax import pipelines

  if mesh_devices(args.cpu_devices, args.batch) > 1 and jax.default_backend() != "cpu":
    raise SystemExit(f"--cpu_devices is for the CPU backend; JAX's default backend is {jax.default_backend()}")
  dtype = jnp.float32 if args.precision == "float32" else jnp.bfloat16
  t0 = time.perf_counter()
  pipe, params = pipelines.from_pretrained(args.folder, dtype=dtype, param_dtype=dtype)
  plan = pipelines.plan_for(pipe, args.steps)
  mesh = jax.make_mesh((jax.device_count(),), ("data",)) if mesh_devices(args.cpu_devices, args.batch) > 1 else None
  params = pipelines.on_mesh(mesh, 1, params)[0]  # the replicas made once, not per call
  load = time.perf_counter() - t0
  backend, kind = jax.default_backend(), jax.devices()[0].device_kind
  ran_on = {"device": f"{backend}{'' if kind == backend else f' ({kind})'} x{jax.device_count()}",
            "dtype": ",".join(sorted({str(p.dtype) for p in jax.tree.leaves(params["unet"])}))}

  def call():
    return pipelines.generate(pipe, params, [PROMPT] * args.batch, negative_prompts=[NEGATIVE] * args.batch,
                              height=args.size, width=args.size, plan=plan, guidance_scale=7.5, mesh=mesh).images

  _serve(call, load, ran_on)


def ran_on_line(ran_on: dict) -> str:
  """The header's line on where and in what dtype each framework ran (``ran_on``: {"diffusers": {"device",
  "dtype", "attention"}, "diffjax": {"device", "dtype"}}, as the children report), with a warning where one ran
  on a GPU and the other did not, or where diffusers on CUDA does not use PyTorch's SDPA (AttnProcessor2_0)."""
  ref, jx = ran_on["diffusers"], ran_on["diffjax"]
  line = (f"diffusers ran on {ref['device']} in {ref['dtype']} (attention: {ref['attention']}); "
          f"diffjax on {jx['device']}, U-Net params {jx['dtype']}")
  cuda = ref["device"].startswith("cuda")
  if cuda != (jx["device"].split()[0] in ("gpu", "cuda")):
    line += "\nWARNING: one framework ran on a GPU and the other did not: do not compare these figures"
  if cuda and ref["attention"] != "AttnProcessor2_0":
    line += "\nWARNING: diffusers' U-Net does not use PyTorch's SDPA (AttnProcessor2_0)"
  return line


class _Child:
  """One framework's child process, loaded and past its first call, answering ``call()`` with a timed call."""

  def __init__(self, args, framework: str, size: int, batch: int, cache: str):
    self.name = f"{framework} {size}px batch {batch}"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--folder", args.folder, "--size",
           str(size), "--batch", str(batch), "--steps", str(args.steps), "--cache", cache, "--cpu_devices",
           str(args.cpu_devices), "--arch", args.arch, "--precision", args.precision]
    env = child_environment(args.numpy_hugepages)
    if framework == "diffjax":  # on a GPU the warm child and diffusers' share it: JAX takes less than its 75%
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
    if framework == "diffjax" and mesh_devices(args.cpu_devices, batch) > 1:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}")
    self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child never blocks on it
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                 env=env)
    self.ready = self._answer()
    self.times: list[float] = []

  def _answer(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.stderr.seek(0)
      raise RuntimeError(f"{self.name} failed:\n{self.stderr.read()[-3000:]}")
    return json.loads(line)

  def call(self) -> float:
    self.proc.stdin.write("call\n")
    self.proc.stdin.flush()
    self.times.append(self._answer()["t"])
    return self.times[-1]

  def close(self) -> dict:
    """Ends the child; returns its load time, first call, steady calls and peak RSS."""
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    out = self.ready | {"times": self.times} | self._answer()
    self.proc.communicate()
    self.stderr.close()
    return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="256,512")
  parser.add_argument("--batches", default="1,4")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--reps", type=int, default=3, help="timed calls after the first, per framework")
  parser.add_argument("--arch", choices=tuple(ARCHS), default="sd15",
                      help="sd15: SD 1.5's architecture; sdxl: SDXL base's (two text encoders, Euler)")
  parser.add_argument("--precision", choices=("float32", "half"), default="float32",
                      help="half: diffjax in bfloat16; diffusers in float16 on CUDA, bfloat16 on a CPU")
  parser.add_argument("--folder", default="",
                      help="the random-weight folder of --arch (made on first use; default: "
                      "<tmp>/diffjax_bench_<arch>)")
  parser.add_argument("--json", default="", type=output_path, help="also write the results here")
  parser.add_argument("--numpy_hugepages", action="store_true",
                      help="keep numpy's transparent-huge-page advice in the children "
                      "(default: NUMPY_MADVISE_HUGEPAGE=0)")
  parser.add_argument("--cpu_devices", type=int, default=1,
                      help="diffjax splits each batch that divides evenly over this many CPU devices (XLA's "
                      "simulated host devices, one mesh: pipelines.generate(mesh=)); diffusers is unchanged; "
                      "CPU backend only")
  parser.add_argument("--child", choices=("diffusers", "diffjax"), help=argparse.SUPPRESS)
  parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--cache", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    (child_diffusers if args.child == "diffusers" else child_diffjax)(args)
    return
  args.folder = args.folder or os.path.join(tempfile.gettempdir(), f"diffjax_bench_{args.arch}")
  if not os.path.isfile(os.path.join(args.folder, "model_index.json")):
    print(f"making the random-weight {args.arch} folder {args.folder} ...", flush=True)
    t0 = time.perf_counter()
    make_folder(args.folder, arch=args.arch)
    print(f"made in {time.perf_counter() - t0:.0f} s", flush=True)
  check_folder_arch(args.folder, args.arch)
  scheduler = ARCHS[args.arch][1].removesuffix("Scheduler").removesuffix("Discrete")
  precision = ("float32" if args.precision == "float32" else
               "half: diffjax bfloat16, diffusers float16 on CUDA / bfloat16 on a CPU")
  env = child_environment(args.numpy_hugepages)
  faults = [fresh_memory_s_per_gib(env)]
  advised = fresh_memory_s_per_gib(child_environment(True))
  print(f"{args.arch}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.steps} {scheduler} "
        f"steps, CFG 7.5, diffjax on {args.cpu_devices} CPU device(s) where the batch divides (CPU backend); "
        f"{precision}; {args.reps} paired calls after the first (median); fresh memory {faults[0]:.2f} s/GiB as "
        f"the children run ({'numpy huge pages' if args.numpy_hugepages else 'NUMPY_MADVISE_HUGEPAGE=0'}), "
        f"{advised:.2f} s/GiB with numpy's huge-page advice")
  header = (f"{'size':>5} {'batch':>5} {'devices':>7} | "
            f"{'diffusers s/img':>15} {'diffjax s/img':>13} | {'img/s ratio (pairs)':>19} | "
            f"{'cold compile s':>14} {'warm start s':>12} | {'RSS GiB torch':>13} {'jax':>5} | {'faults s/GiB':>12}")
  rows, ran_on = [], {}
  for size in (int(s) for s in args.sizes.split(",")):
    for batch in (int(b) for b in args.batches.split(",")):
      with tempfile.TemporaryDirectory() as cache:
        cold = _Child(args, "diffjax", size, batch, cache)
        cold.call()
        cold = cold.close()
        ref = _Child(args, "diffusers", size, batch, "")  # loads and makes its first call alone
        warm = _Child(args, "diffjax", size, batch, cache)
        for _ in range(args.reps):  # in turn: the i-th calls of both form a pair
          ref.call()
          warm.call()
        ref, warm = ref.close(), warm.close()
      t_ref, t_jax = statistics.median(ref["times"]), statistics.median(warm["times"])
      ratios = [a / b for a, b in zip(ref["times"], warm["times"], strict=True)]
      seen = {"diffusers": {k: ref[k] for k in ("device", "dtype", "attention")},
              "diffjax": {k: warm[k] for k in ("device", "dtype")}}
      if seen != ran_on:  # before the first row, and again should a point run elsewhere
        ran_on = seen
        print(ran_on_line(ran_on) + "\n\n" + header + "\n" + "-" * len(header), flush=True)
      row = {"size": size, "batch": batch, "diffjax_devices": mesh_devices(args.cpu_devices, batch),
             "diffusers_s_per_image": t_ref / batch,
             "diffjax_s_per_image": t_jax / batch, "throughput_ratio": t_ref / t_jax,
             "pair_ratio_range": [min(ratios), max(ratios)],
             "cold_compile_s": cold["first_s"] - statistics.median(cold["times"]),
             "warm_start_s": warm["first_s"] - t_jax, "diffjax_load_s": warm["load_s"],
             "diffusers_load_s": ref["load_s"], "ran_on": seen,
             "peak_rss_gib": {"diffusers": ref["peak_rss_gib"], "diffjax": warm["peak_rss_gib"]},
             "raw": {"diffusers": ref, "diffjax_cold": cold, "diffjax_warm": warm}}
      faults.append(fresh_memory_s_per_gib(env))
      row["fresh_memory_s_per_gib"] = faults[-1]
      rows.append(row)
      print(f"{size:>5} {batch:>5} {row['diffjax_devices']:>7} | "
            f"{row['diffusers_s_per_image']:>15.2f} {row['diffjax_s_per_image']:>13.2f} | "
            f"{row['throughput_ratio']:>5.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{row['cold_compile_s']:>14.1f} {row['warm_start_s']:>12.1f} | "
            f"{ref['peak_rss_gib']:>13.1f} {warm['peak_rss_gib']:>5.1f} | {faults[-1]:>12.2f}", flush=True)
  print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
  if max(faults) > SLOW_FAULTS:
    print(f"WARNING: fresh memory took up to {max(faults):.2f} s/GiB to fault in (a quiet machine: ~0.15): "
          f"loading, first calls and allocation-heavy steps are slowed; do not compare these figures")
  if args.json:
    write_json(args.json, {"arch": args.arch, "precision": args.precision, "folder": args.folder,
               "steps": args.steps, "reps": args.reps, "cores": os.cpu_count(),
               "fresh_memory_s_per_gib": faults, "numpy_hugepages": args.numpy_hugepages,
               "advised_fresh_memory_s_per_gib": advised, "rows": rows}, indent=2)


if __name__ == "__main__":
  main()
