"""``from_pretrained``: any supported diffusers pipeline folder -> (pipeline, params), by its model_index.

SD3 / SD3.5 (an SD3 class name): ``sd3.sd3_from_pretrained``; FLUX.1 (a Flux class name):
``flux.flux_from_pretrained``; PixArt-alpha / PixArt-Sigma (a PixArt class name): ``pixart.pixart_from_pretrained``
(T5's default length for the class; ``pixart.generate`` adds diffusers' resolution binning); SDXL base (a second
text encoder, or an SDXL class name): ``sdxl.sdxl_from_pretrained``; the x4 upscaler
(``StableDiffusionUpscalePipeline``): ``upscale.upscaler_from_pretrained``; anything else
(SD 1.x/2.x, SD inpainting): ``stable_diffusion.sd_from_pretrained``. Each loader checks the
folder's components itself; this module only dispatches, so the loaders need not know each other.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from diffjax.pipelines import programs
from diffjax.pipelines.core import Pipeline
from diffjax.pipelines.flux import flux_from_pretrained
from diffjax.pipelines.pixart import pixart_from_pretrained
from diffjax.pipelines.sd3 import sd3_from_pretrained
from diffjax.pipelines.sdxl import sdxl_from_pretrained
from diffjax.pipelines.stable_diffusion import (
    UPSCALER,
    check_folder,
    is_flux,
    is_pixart,
    is_sd3,
    is_sdxl,
    sd_from_pretrained,
)
from diffjax.pipelines.upscale import upscaler_from_pretrained


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[Pipeline, dict]:
  """(pipeline, params) of a diffusers folder: SD 1.x/2.x, SD inpainting, SDXL base, the x4 upscaler, SD3, FLUX.1,
  PixArt-alpha or PixArt-Sigma.

  ``dtype`` is the networks' computation dtype (e.g. ``jnp.bfloat16``; VAEs decode in float32 as
  diffusers' ``force_upcast`` does), ``param_dtype`` that of the parameters. The params' keys are
  the folder's networks ({"unet", "vae", "text_encoder"} and SDXL's "text_encoder_2"; "transformer" for SD3, Flux
  and PixArt).
  """
  index = check_folder(os.fspath(path))
  programs.preload()  # read the recently used compiled programs while the weights load
  if is_sd3(index):
    load = sd3_from_pretrained
  elif is_flux(index):
    load = flux_from_pretrained
  elif is_pixart(index):
    load = pixart_from_pretrained
  elif is_sdxl(index):
    load = sdxl_from_pretrained
  elif index.get("_class_name") == UPSCALER:
    load = upscaler_from_pretrained
  else:
    load = sd_from_pretrained
  return load(path, dtype=dtype, param_dtype=param_dtype)
