"""Generation from a pretrained pipeline: a Stable Diffusion (diffusers) folder or a diffjax training workdir.

python -m diffjax.main --config=configs/generate.py --workdir=/tmp/gen \
    --config.pretrained=PATH --config.prompts="('a photo of a cat', 'a lake at dawn')"
img2img: --config.task=img2img --config.init_image=photo.png --config.strength=0.6
Sampler: the folder's scheduler (``sampler.name = ""``) with ``sampler.steps`` steps, or any
diffjax solver by name on ``sampler.grid`` within ``sampler.steps`` network evaluations
(e.g. --config.sampler.name=dpmpp_2m --config.sampler.grid=karras --config.sampler.steps=20).
Outputs under --workdir: one PNG per image, samples.npz, generation.json (everything needed
to reproduce each image: seed, sampler, grid, guidance, the weights' SHA-256).
The arg ``tiny`` (configs/generate.py:tiny) makes small, fast settings for a check.
"""

import ml_collections


def get_config(arg: str = ""):
  config = ml_collections.ConfigDict()
  config.job = "generate"
  config.pretrained = ""  # a diffusers pipeline folder (model_index.json) or a diffjax workdir (config.json)
  config.task = "txt2img"  # txt2img | img2img
  config.prompts = ("a photograph of an astronaut riding a horse",)
  config.negative_prompt = ""  # one for all prompts ("" = unconditional)
  config.num_per_prompt = 1
  config.height = 512  # pixels; img2img: must equal the init image's size (0: take it from the image)
  config.width = 512
  config.init_image = ""  # img2img: an RGB image file
  config.strength = 0.8  # img2img: how far towards noise the image is taken, in (0, 1]
  config.seed = 0  # image i gets seed + i
  config.batch_size = 4  # images per compiled call
  config.dtype = "float32"  # computation dtype of the networks (bfloat16 on accelerators)
  config.sampler = ml_collections.ConfigDict()
  config.sampler.name = ""  # "": the folder's scheduler; else a diffjax solver (euler, heun, dpmpp_2m, ...)
  config.sampler.grid = "karras"  # the diffjax solver's grid (ignored for the folder's scheduler)
  config.sampler.steps = 50  # scheduler steps, or the diffjax solver's network evaluations
  config.sampler.options = ml_collections.ConfigDict()  # solver options (diffjax solvers only)
  config.sampler.guidance_scale = 7.5
  config.sampler.guidance_rescale = 0.0  # phi of Lin et al. (2024); 0 = off
  if arg == "tiny":
    config.height = config.width = 64
    config.sampler.steps = 4
    config.batch_size = 2
  return config
