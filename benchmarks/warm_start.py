"""A pipeline's warm start with and without reading stored programs ahead, in fresh processes.

Each run is a new process on the same JAX persistent cache (``--cache``): it loads the folder, then calls
``pipelines.generate`` twice (txt2img, one prompt with a negative prompt, CFG 7.5) and prints one JSON line:
load, first call, steady call, their difference (the warm start) and load + first call. ``--modes`` lists
the runs in order: ``on`` (the loaders read the most recently used programs ahead:
``DIFFJAX_READ_AHEAD=1``) or ``off`` (the default). The first run of an empty cache compiles.

  python benchmarks/warm_start.py --folder /tmp/diffjax_bench_sd15 --modes on,off,on,off,on
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _child(args) -> None:
  import jax
  jax.config.update("jax_compilation_cache_dir", args.cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from diffjax import pipelines
  from diffjax.pipelines import folders
  os.environ[folders.programs.READ_AHEAD] = "1" if args.child == "on" else "0"
  start = time.perf_counter()
  pipe, params = pipelines.from_pretrained(args.folder)
  load = time.perf_counter() - start
  plan = pipelines.plan_for(pipe, args.steps)
  calls = []
  for _ in range(2):
    start = time.perf_counter()
    pipelines.generate(pipe, params, [args.prompt], negative_prompts=["blurry, low quality"], height=args.size,
                       width=args.size, plan=plan, guidance_scale=7.5)
    calls.append(time.perf_counter() - start)
  print(json.dumps({"mode": args.child, "load_s": round(load, 2), "first_s": round(calls[0], 2),
                    "steady_s": round(calls[1], 2), "warm_start_s": round(calls[0] - calls[1], 2),
                    "to_first_image_s": round(load + calls[0], 2)}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "diffjax_bench_sd15"),
                      help="a diffusers pipeline folder (benchmarks/generation.py writes SD 1.5 at random weights)")
  parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "diffjax_warm_start_cache"))
  parser.add_argument("--modes", default="on,off,on,off,on")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse on the moon, detailed")
  parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return _child(args)
  for mode in args.modes.split(","):
    subprocess.run([sys.executable, __file__, "--child", mode, "--folder", args.folder, "--cache", args.cache,
                    "--size", str(args.size), "--steps", str(args.steps), "--prompt", args.prompt], check=True)


if __name__ == "__main__":
  main()
