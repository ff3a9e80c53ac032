"""txt2img end to end, diffjax vs diffusers, on the real SD 1.5 architecture with random weights (no download).

One call = text encoding (CLIP ViT-L/14 shapes), ``--steps`` sampler steps with classifier-free
guidance (the U-Net on a batch of 2B), VAE decoding, images back on the host. Both sides load
the same saved diffusers folder (random weights at SD 1.5's shapes; scheduler: SD 1.5's PNDM
config) and run the same scheduler and steps in float32 on this machine's cores.

Each framework runs in its own child process, so that peak host memory (``ru_maxrss``) and
start-up costs are each framework's own. For each point: diffjax with an empty persistent
compilation cache ("cold": its first call minus a steady call is compilation); then diffusers
and diffjax on the cache the cold run filled ("warm": first call minus a steady call is the
warm start), both kept alive and called in turn, diffusers then diffjax, ``--reps`` times, so
that the load of a shared host drifting over minutes moves both sides of every pair alike.
Reported per point: seconds per image (median of the steady calls), the diffjax/diffusers
throughput ratio of those medians with the range of the per-pair ratios, cold compile, warm
start, and peak RSS of each process.

  python benchmarks/generation.py                                  # 256 and 512 px, batch 1 and 4, 10 steps
  python benchmarks/generation.py --sizes 256 --batches 1 --steps 4 --reps 1   # a quick look
  python benchmarks/generation.py --sizes 512 --batches 4 --cpu_devices 2      # the batch over 2 CPU devices

``--cpu_devices N`` runs diffjax on N simulated CPU devices (XLA's host-platform device count: partitions
of the same cores, not more hardware) with each batch that N divides split over them
(``pipelines.generate(mesh=)``): on this 2-core CPU two devices ran the SD 1.5 U-Net ~4% faster than one.

The tokenizer is a small BPE vocabulary made here in CLIP's format: token ids differ from the real
CLIP vocabulary, which changes no shape and no cost (the sequence is always padded to 77).

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

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, dramatic light"
NEGATIVE = "blurry, low quality"
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


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


def make_folder(folder: str, tiny: bool = False) -> None:
  """A diffusers StableDiffusionPipeline folder with random weights at SD 1.5's shapes, or (``tiny``) SD's
  architecture at toy widths: a 4-level VAE (8x downsampling, 4 latent channels), diffjax's tiny U-Net, a
  2-layer CLIP text tower of width 32."""
  import diffusers
  import torch
  import transformers

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from test_tokenizers import CORPUS, _train_bpe

  from diffjax.convert.configs import unet_config_to_diffusers, vae_config_to_diffusers
  from diffjax.models.unet import UNET_CONFIGS
  from diffjax.models.vae import VAE_CONFIGS, VAEConfig

  torch.manual_seed(0)
  tok = os.path.join(folder, "_tokenizer_files")
  os.makedirs(tok, exist_ok=True)
  vocab, merges = _train_bpe(CORPUS + [PROMPT, NEGATIVE], 200)
  with open(os.path.join(tok, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  with open(os.path.join(tok, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
  tokenizer = transformers.CLIPTokenizer(os.path.join(tok, "vocab.json"), os.path.join(tok, "merges.txt"),
                                         model_max_length=77)
  widths = (dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4) if tiny else  # CLIP ViT-L/14's text tower
            dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **widths, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocab["<|startoftext|>"],
      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
  unet_config = UNET_CONFIGS["tiny" if tiny else "sd15"]
  vae_config = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8) if tiny else \
      VAE_CONFIGS["sd"]
  unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(unet_config))
  vae = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(vae_config))
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=diffusers.PNDMScheduler(**SD15_SCHEDULER),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)


def _serve(call, load_s: float) -> None:
  """The child's side of the protocol: time the first call, report, then one timed call per ``call`` line on
  stdin until ``quit`` (or end of input), each reported as a JSON line on stdout."""
  t0 = time.perf_counter()
  call()
  print(json.dumps({"load_s": load_s, "first_s": time.perf_counter() - t0}), flush=True)
  for line in sys.stdin:
    if line.strip() != "call":
      break
    t0 = time.perf_counter()
    call()
    print(json.dumps({"t": time.perf_counter() - t0}), flush=True)
  print(json.dumps({"peak_rss_gib": _peak_rss_gib()}), flush=True)


def child_diffusers(args) -> None:
  import diffusers
  import torch

  torch.set_num_threads(os.cpu_count())
  t0 = time.perf_counter()
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  load = time.perf_counter() - t0

  def call():
    with torch.no_grad():
      return pipe([PROMPT] * args.batch, negative_prompt=[NEGATIVE] * args.batch, height=args.size, width=args.size,
                  num_inference_steps=args.steps, guidance_scale=7.5, output_type="np").images

  _serve(call, load)


def child_diffjax(args) -> None:
  import jax

  jax.config.update("jax_compilation_cache_dir", args.cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from diffjax import pipelines

  t0 = time.perf_counter()
  pipe, params = pipelines.from_pretrained(args.folder)
  plan = pipelines.plan_for(pipe, args.steps)
  mesh = jax.make_mesh((jax.device_count(),), ("data",)) if mesh_devices(args.cpu_devices, args.batch) > 1 else None
  params = pipelines.on_mesh(mesh, 1, params)[0]  # the replicas made once, not per call
  load = time.perf_counter() - t0

  def call():
    return pipelines.generate(pipe, params, [PROMPT] * args.batch, negative_prompts=[NEGATIVE] * args.batch,
                              height=args.size, width=args.size, plan=plan, guidance_scale=7.5, mesh=mesh).images

  _serve(call, load)


class _Child:
  """One framework's child process, loaded and past its first call, answering ``call()`` with a timed call."""

  def __init__(self, args, framework: str, size: int, batch: int, cache: str):
    self.name = f"{framework} {size}px batch {batch}"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--folder", args.folder, "--size",
           str(size), "--batch", str(batch), "--steps", str(args.steps), "--cache", cache, "--cpu_devices",
           str(args.cpu_devices)]
    env = child_environment(args.numpy_hugepages)
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
  parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "diffjax_bench_sd15"),
                      help="the random-weight SD 1.5 folder (made on first use)")
  parser.add_argument("--json", default="", help="also write the results here")
  parser.add_argument("--numpy_hugepages", action="store_true",
                      help="keep numpy's transparent-huge-page advice in the children "
                      "(default: NUMPY_MADVISE_HUGEPAGE=0)")
  parser.add_argument("--cpu_devices", type=int, default=1,
                      help="diffjax splits each batch that divides evenly over this many CPU devices (XLA's "
                      "simulated host devices, one mesh: pipelines.generate(mesh=)); diffusers is unchanged")
  parser.add_argument("--child", choices=("diffusers", "diffjax"), help=argparse.SUPPRESS)
  parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--cache", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    (child_diffusers if args.child == "diffusers" else child_diffjax)(args)
    return
  if not os.path.isfile(os.path.join(args.folder, "model_index.json")):
    print(f"making the random-weight SD 1.5 folder {args.folder} ...", flush=True)
    make_folder(args.folder)
  env = child_environment(args.numpy_hugepages)
  faults = [fresh_memory_s_per_gib(env)]
  advised = fresh_memory_s_per_gib(child_environment(True))
  print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.steps} PNDM steps, CFG 7.5, "
        f"diffjax on {args.cpu_devices} CPU device(s) where the batch divides; "
        f"float32; {args.reps} paired calls after the first (median); fresh memory {faults[0]:.2f} s/GiB as "
        f"the children run ({'numpy huge pages' if args.numpy_hugepages else 'NUMPY_MADVISE_HUGEPAGE=0'}), "
        f"{advised:.2f} s/GiB with numpy's huge-page advice\n")
  header = (f"{'size':>5} {'batch':>5} {'devices':>7} | "
            f"{'diffusers s/img':>15} {'diffjax s/img':>13} | {'img/s ratio (pairs)':>19} | "
            f"{'cold compile s':>14} {'warm start s':>12} | {'RSS GiB torch':>13} {'jax':>5} | {'faults s/GiB':>12}")
  print(header + "\n" + "-" * len(header), flush=True)
  rows = []
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
      row = {"size": size, "batch": batch, "diffjax_devices": mesh_devices(args.cpu_devices, batch),
             "diffusers_s_per_image": t_ref / batch,
             "diffjax_s_per_image": t_jax / batch, "throughput_ratio": t_ref / t_jax,
             "pair_ratio_range": [min(ratios), max(ratios)],
             "cold_compile_s": cold["first_s"] - statistics.median(cold["times"]),
             "warm_start_s": warm["first_s"] - t_jax, "diffjax_load_s": warm["load_s"],
             "diffusers_load_s": ref["load_s"], "peak_rss_gib": {"diffusers": ref["peak_rss_gib"],
                                                                  "diffjax": warm["peak_rss_gib"]},
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
    with open(args.json, "w") as f:
      json.dump({"steps": args.steps, "reps": args.reps, "cores": os.cpu_count(), "fresh_memory_s_per_gib": faults,
                 "numpy_hugepages": args.numpy_hugepages, "advised_fresh_memory_s_per_gib": advised,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
