"""Super-resolution: the Stable Diffusion x4 upscaler (diffusers' ``StableDiffusionUpscalePipeline``).

The network denoises latents of the low-resolution image's size, conditioned on the prompt and
on the low-res image itself: every evaluation sees ``[x (c latent channels), image (3 RGB
channels)]``, the image in pixels in [-1, 1], noised once by its own forward process (a DDPM
``DiscreteVP``, the folder's ``low_res_scheduler``: linear betas 1e-4 .. 0.02) to the integer
time ``noise_level`` with its own standard normal draw. ``noise_level`` is also the network's
class label, the same for both CFG branches; the released model predicts v. The VAE (3 levels)
decodes the latents to 4x the low-res size; its ``scaling_factor`` is 0.08333 whatever its config
says (diffusers' pipeline forces it).

``upscale_image`` is the pure jit-compatible task function (``core.txt2img``'s counterpart); the
image and its labels ride in the conditioning pytree, so classifier-free guidance batches them
with the prompts. ``upscale`` is the host entry (``generate.generate``'s counterpart).
``upscaler_from_pretrained`` loads a diffusers upscaler folder (``folders.from_pretrained`` calls it
for model_index ``_class_name`` ``StableDiffusionUpscalePipeline``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffjax import watermark as wm
from diffjax.convert.files import read_json_config
from diffjax.pipelines import core, programs
from diffjax.pipelines.generate import (
  Output,
  _check_image,
  batched,
  draw_noise,
  finish,
  given_or,
  on_mesh,
  plan_for,
  request,
  solver_for,
)
from diffjax.pipelines.schedulers import DiffusersScheduler, Plan, discrete_process
from diffjax.pipelines.stable_diffusion import assemble, check_folder, load_parts
from diffjax.processes import DiscreteVP
from diffjax.samplers import Solver

Array = jax.Array
IMAGE_CHANNELS = 3
VAE_SCALING_FACTOR = 0.08333  # what diffusers' upscale pipeline sets on its VAE, whatever the config holds
DEFAULT_STEPS = 75  # diffusers' default num_inference_steps for this pipeline
_PLAIN = core.Guidance()  # guidance without rescale or interval


@dataclasses.dataclass(frozen=True, eq=False)
class UpscalePipeline(core.Pipeline):
  """A ``Pipeline`` whose network also takes a noised low-res image and its noise level (the x4 upscaler).

  ``predict`` is ``(params, x (B, h, w, c + 3), t_net (B,), context, class_labels (B,) int) ->
  prediction``: x = concat([latents (c), low-res image (3)]); ``latent_channels`` is c, that of
  the VAE, and ``downsample`` the VAE's factor (output size / low-res size).

  Attributes:
    low_res_process: the forward process of the low-res image; ``noise_level`` is its time.
    max_noise_level: the largest ``noise_level`` accepted (the folder's ``max_noise_level``).
    size_multiple: the low-res height and width must be multiples of it (the U-Net's downsampling).
    Other fields as in ``Pipeline``.
  """

  low_res_process: DiscreteVP | None = None
  max_noise_level: int = 350
  size_multiple: int = 1
  entry: ClassVar[str] = "upscale"


# ----------------------------------------------------------------------------------
# The pure, jit-compatible task function.
# ----------------------------------------------------------------------------------
def noised_low_res(process: DiscreteVP, image: Array, image_noise: Array, noise_level) -> Array:
  """alpha(l) image + sigma(l) image_noise: the low-res image (B, h, w, 3) in [-1, 1] at integer time
  ``noise_level`` (scalar or (B,)) of ``process`` (diffusers' ``low_res_scheduler.add_noise``)."""
  t = jnp.broadcast_to(jnp.asarray(noise_level, jnp.float32), image.shape[:1])[:, None, None, None]
  return (process.alpha(t) * image + process.sigma(t) * image_noise).astype(image.dtype)


def upscale_image(pipe: UpscalePipeline, params, ids, mask, negative_ids, negative_mask, image, image_noise,
                  noise_level, noise, ts, guidance_scale, key=None, *, solver: Solver, init_scale,
                  denoise_final: bool = True, options: core.Guidance = _PLAIN, decode: bool = True):
  """4x images (B, f h, f w, C) in [-1, 1] of low-res images (latents (B, h, w, c) with ``decode=False``).

  Args:
    pipe: an ``UpscalePipeline``.
    ids, mask: (B, L) prompt tokens; negative_ids, negative_mask: (B or 1, L).
    image: (B, h, w, 3) low-res images in [-1, 1]; image_noise: (B, h, w, 3) standard normal, the
      draw that noises them to ``noise_level`` (an int32 scalar or (B,), traced: sweeping it does not
      recompile; also the network's class label).
    noise: (B, h, w, c) standard normal; the initial state is ``init_scale * noise`` at ts[0].
    Other arguments as in ``core.txt2img``. x is in process coordinates, which is diffusers'
    ``scheduler.scale_model_input`` of its latents.
  """
  labels = jnp.broadcast_to(jnp.asarray(noise_level, jnp.int32), image.shape[:1])
  low_res = noised_low_res(pipe.low_res_process, image, image_noise, labels)

  def predict(p, x, t, cond):
    context, pixels, class_labels = cond
    return pipe.predict(p, jnp.concatenate([x, pixels.astype(x.dtype)], axis=-1), t, context, class_labels)

  def encode_text(p, i, m):  # both CFG branches get the same image and labels (diffusers repeats them)
    return pipe.encode_text(p, i, m), low_res, labels

  net = dataclasses.replace(pipe, predict=predict, encode_text=encode_text)
  return core.txt2img(net, params, ids, mask, negative_ids, negative_mask, noise, ts, guidance_scale, key,
                      solver=solver, init_scale=init_scale, denoise_final=denoise_final, options=options,
                      decode=decode)


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _compiled(pipe: UpscalePipeline, solver: str, solver_options: tuple, denoise_final: bool,
              guidance: core.Guidance, custom=None):
  """One jitted program per (pipeline, solver, final jump, guidance options); grids, scales, noise levels traced."""
  task = functools.partial(upscale_image, pipe, solver=solver_for(pipe, solver, solver_options, custom),
                           denoise_final=denoise_final, options=guidance, decode=False)
  return programs.program(pipe, task, "upscale", solver, solver_options, denoise_final, guidance)


def _noise_level(noise_level, top: int) -> int:
  if isinstance(noise_level, bool) or not isinstance(noise_level, int | np.integer):
    raise ValueError(f"noise_level must be an integer in [0, {top}], got {noise_level!r}")
  if not 0 <= noise_level <= top:
    raise ValueError(f"noise_level must be in [0, {top}] (this pipeline's max_noise_level), got {noise_level}")
  return int(noise_level)


def _low_res_images(image, multiple: int) -> np.ndarray:
  """(B, h, w, 3) float32 in [0, 1] of a (B, h, w, 3) or (h, w, 3) image (checked; h, w multiples of ``multiple``)."""
  shape = np.shape(image)
  h, w = shape[-3:-1] if len(shape) in (3, 4) else (0, 0)
  image = _check_image(image, h, w, IMAGE_CHANNELS)
  if h % multiple or w % multiple:
    raise ValueError(f"low-res image is {h} x {w}: height and width must be multiples of {multiple} "
                     f"(the U-Net's downsampling); crop or pad it")
  return image


def upscale(pipe: UpscalePipeline, params, prompts: str | Sequence[str], image, *, noise_level: int = 20,
            negative_prompts=None, plan: Plan | None = None, guidance_scale: float = 9.0,
            guidance: core.Guidance | None = None, seed: int | Sequence[int] = 0, noise=None,
            image_noise=None, watermark: wm.Watermark = wm.DEFAULT, mesh: jax.sharding.Mesh | None = None) -> Output:
  """Upscale ``image`` 4x (the VAE's factor) guided by ``prompts``, one image per prompt.

  Args:
    pipe: an ``UpscalePipeline`` (``from_pretrained`` of an x4 upscaler folder).
    prompts: B prompts; negative_prompts: B (or one) negative prompts; None: the empty prompt.
    image: (B or 1, h, w, 3) or (h, w, 3) float in [0, 1], h and w multiples of ``pipe.size_multiple``.
    noise_level: int in [0, ``pipe.max_noise_level``]: how much noise the low-res image gets
      (more lets the model invent more detail).
    plan: the sampling plan (``plan_for``; default the folder's scheduler with 75 steps, diffusers' default).
    guidance_scale, guidance, seed: as in ``generate.generate``.
    noise: (B, h, w, c) standard normal initial latents; image_noise: (B, h, w, 3) standard normal,
      the draw that noises the low-res image. Both default to draws from each image's seed.
    watermark: the pixel mark every image carries (``diffjax.watermark``; the latent mark is txt2img's).
    mesh: as in ``generate.generate``: the images split over its devices.

  Returns:
    ``Output`` with images (B, f h, f w, 3) in [0, 1] (f = ``pipe.downsample``, 4) and latents (B, h, w, c).
  """
  if not isinstance(pipe, UpscalePipeline):
    raise ValueError(f"upscale needs an UpscalePipeline (an x4 upscaler folder), got {type(pipe).__name__}")
  level = _noise_level(noise_level, pipe.max_noise_level)
  guidance = guidance or core.Guidance()
  plan = plan or plan_for(pipe, DEFAULT_STEPS)
  low = _low_res_images(image, pipe.size_multiple)
  h, w = low.shape[1:3]
  height, width = pipe.downsample * h, pipe.downsample * w
  req = request(pipe, prompts, negative_prompts, seed, height, width)
  low = batched(low, req.shape[0], "images")
  noise = given_or(req.draws[0], noise, "noise")
  # The image noise from each image's seed too: the key of img2img's image noise, at the image's shape.
  image_noise = given_or(draw_noise(req.seeds, (h, w, IMAGE_CHANNELS))[0][1], image_noise, "image_noise")
  params, tokens, low, image_noise, noise = on_mesh(mesh, req.shape[0], params, req.tokens, 2.0 * low - 1.0,
                                                    image_noise, noise)
  run = _compiled(pipe, plan.name, plan.options, plan.denoise_final, guidance, plan.custom_solver)
  latents = run(params, *tokens, jnp.asarray(low), image_noise, jnp.int32(level), noise,
                jnp.asarray(plan.ts), jnp.float32(guidance_scale), req.solver_key,
                init_scale=jnp.float32(plan.init_scale))
  record = {"task": "upscale"} | req.record(height, width, plan, guidance_scale, guidance)
  record |= {"noise_level": level, "low_res_size": [int(h), int(w)]}
  return finish(pipe, params, latents, record, watermark)


# ----------------------------------------------------------------------------------
# From a diffusers folder.
# ----------------------------------------------------------------------------------
def load_low_res_process(folder: str) -> DiscreteVP:
  """The low-res image's process of an upscaler folder: ``low_res_scheduler/scheduler_config.json`` (a DDPM)."""
  path = os.path.join(folder, "low_res_scheduler", "scheduler_config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{folder}: an upscaler folder needs {path} (the low-res image's noise schedule)")
  config = read_json_config(path)
  if config.get("_class_name") != "DDPMScheduler":
    raise ValueError(f"{path}: the low-res scheduler must be a DDPMScheduler, got {config.get('_class_name')!r}")
  if config.get("rescale_betas_zero_snr", False):
    raise NotImplementedError(f"{path}: rescale_betas_zero_snr is not mapped to diffjax")
  return discrete_process(config)


def upscaler_from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32,
                             param_dtype=jnp.float32) -> tuple[UpscalePipeline, dict]:
  """(pipeline, params) of an x4 upscaler diffusers folder; params {"unet", "vae", "text_encoder"}."""
  folder = os.fspath(path)
  check_folder(folder)
  parts, params = load_parts(folder, dtype=dtype, param_dtype=param_dtype)
  return assemble_upscaler(*parts, folder=folder), params


def assemble_upscaler(unet, vae, text, tokenizer, scheduler: DiffusersScheduler, *, folder: str) -> UpscalePipeline:
  """The ``UpscalePipeline`` of an upscaler folder's loaded modules (params {"unet", "vae", "text_encoder"}).

  Reads ``low_res_scheduler/`` and ``max_noise_level`` (model_index.json, default 350); the VAE
  decodes with ``scaling_factor`` 0.08333 (diffusers' pipeline forces it).
  """
  if vae.config.scaling_factor != VAE_SCALING_FACTOR:
    logging.warning("%s: the VAE's scaling_factor %s is replaced by the upscaler's %s (as diffusers does)", folder,
                    vae.config.scaling_factor, VAE_SCALING_FACTOR)
    vae = vae.clone(config=dataclasses.replace(vae.config, scaling_factor=VAE_SCALING_FACTOR))
  index_path = os.path.join(folder, "model_index.json")
  top = read_json_config(index_path).get("max_noise_level", 350)
  process = load_low_res_process(folder)
  classes = unet.config.num_classes
  if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= process.t_max:
    raise ValueError(f"{index_path}: max_noise_level must be an integer in [0, {int(process.t_max)}], got {top!r}")
  if classes is None or top >= classes:
    raise ValueError(f"{folder}: the upscaler's U-Net needs class labels (num_class_embeds) above "
                     f"max_noise_level {top}, got num_class_embeds={classes}")
  base = assemble(unet, vae, text, tokenizer, scheduler, where=folder, image_channels=IMAGE_CHANNELS)
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(core.Pipeline)}
  fields["fingerprint"] = programs.fingerprint("upscale", base.fingerprint, process, top)
  return UpscalePipeline(**fields, low_res_process=process, max_noise_level=top,
                         size_multiple=2 ** (len(unet.config.block_out_channels) - 1))
