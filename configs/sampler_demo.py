"""Sampler demo on an analytic 2-D Gaussian mixture (exact denoiser, no training).

python -m diffjax.main --config=configs/sampler_demo.py --workdir=/tmp/demo
Override anything, e.g. --config.nfe=5 --config.samplers=euler,dpmpp_2m --config.grid=karras
"""

import ml_collections


def get_config(arg: str = ""):
  config = ml_collections.ConfigDict()
  config.job = "sampler_demo"
  config.seed = 0
  config.process = "sd"  # any diffjax.processes.make_process name
  config.mixture = "ring"  # 'ring' (8 sharp modes on a circle) or a path to an .npz (weights, means, variances)
  config.samplers = "euler,heun,dpmpp_2m,unipc_bh2,ddpm,dpmpp_2m_sde"  # comma-separated registry names
  config.grid = "karras"  # uniform_t | quadratic_t | log_snr | karras
  config.nfe = 10  # denoiser evaluations per sample (the grid is sized to fit)
  config.num_samples = 2000
  if arg == "tiny":
    config.num_samples = 200
    config.samplers = "euler,dpmpp_2m"
  return config
