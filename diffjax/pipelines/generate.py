"""Host-side generation: prompts (and an image) -> images, one compiled program per task and solver.

``generate(pipe, params, prompts, ...)`` tokenizes, draws the noise from a seed (or takes
it), picks the sampling ``Plan`` (the folder's scheduler, or any diffjax solver and grid
by name), runs the jitted task function of ``core`` and returns images in [0, 1] with a
record of everything needed to reproduce them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.pipelines import core
from diffjax.pipelines.schedulers import Plan
from diffjax.samplers import make_solver


def plan_for(pipe: core.Pipeline, num_steps: int = 50, sampler: str | None = None, grid: str = "karras",
             **options) -> Plan:
  """The folder's scheduler for ``num_steps`` (``sampler=None``), else diffjax's ``sampler`` on ``grid``
  within ``num_steps`` denoiser evaluations."""
  if sampler is None:
    if pipe.scheduler is None:
      raise ValueError("this pipeline names no scheduler: choose a diffjax sampler (e.g. sampler='dpmpp_2m')")
    if options:
      raise ValueError(f"solver options {sorted(options)} need a diffjax sampler name")
    return pipe.scheduler.plan(num_steps)
  return Plan.native(pipe.process, sampler, num_steps, grid, **options)


@dataclasses.dataclass
class Output:
  """images: float32 (B, H, W, C) in [0, 1]; latents: what the sampler returned; record: JSON-ready."""

  images: np.ndarray
  latents: np.ndarray
  record: dict


@functools.lru_cache(maxsize=32)
def _program(pipe: core.Pipeline, task: str, name: str, options: tuple, denoise_final: bool, guidance: core.Guidance):
  """One jitted program per (pipeline, task, solver, final jump, guidance options); grids and scales are traced."""
  fn = core.txt2img if task == "txt2img" else core.img2img
  return jax.jit(functools.partial(fn, pipe, solver=make_solver(name, pipe.process, **dict(options)),
                                   denoise_final=denoise_final, options=guidance, decode=False))


@functools.lru_cache(maxsize=8)
def _decoder(pipe: core.Pipeline):
  return jax.jit(pipe.decode)


@functools.lru_cache(maxsize=8)
def _encoder(pipe: core.Pipeline):
  return jax.jit(pipe.encode_image)


def _as_list(prompts, what: str) -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"{what} must be a non-empty list of strings, got {prompts!r}")
  return prompts


def _check_image(image, height: int, width: int, channels: int) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[-1] != channels:
    raise ValueError(f"init image must be (B, H, W, {channels}) or (H, W, {channels}), got shape {image.shape}")
  if image.shape[1:3] != (height, width):
    raise ValueError(f"init image is {image.shape[1]} x {image.shape[2]}, the output {height} x {width}: resize it")
  if not np.issubdtype(image.dtype, np.floating) or image.min() < 0.0 or image.max() > 1.0:
    raise ValueError("init image must be float in [0, 1] (diffjax.images.load_image reads a file so)")
  return image.astype(np.float32)


def generate(pipe: core.Pipeline, params, prompts: str | Sequence[str], *, negative_prompts=None,
             height: int = 512, width: int = 512, plan: Plan | None = None, guidance_scale: float = 7.5,
             guidance: core.Guidance | None = None, seed: int = 0, noise=None, image=None, strength: float = 0.8,
             image_noise=None) -> Output:
  """txt2img, or img2img with ``image``, for one image per prompt.

  Args:
    prompts: B prompts; negative_prompts: B (or one) negative prompts; None: the empty prompt.
    height, width: output size in pixels (multiples of the VAE's downsampling).
    plan: the sampling plan (``plan_for``; default the folder's scheduler with 50 steps).
    guidance_scale: classifier-free guidance scale (1: the conditional prediction alone).
    seed: draws ``noise`` and ``image_noise`` when they are not given.
    noise: (B, h, w, c) standard normal initial noise (the same arrays as another library's).
    image: (B, H, W, C) float in [0, 1] for img2img; strength in (0, 1] as in diffusers.
    image_noise: (B, h, w, c) standard normal for the VAE posterior sample of ``image``.
  """
  guidance = guidance or core.Guidance()
  prompts = _as_list(prompts, "prompts")
  b = len(prompts)
  negative = [""] if negative_prompts is None else _as_list(negative_prompts, "negative_prompts")
  if len(negative) not in (1, b):
    raise ValueError(f"{len(negative)} negative prompts for {b} prompts: give one or {b}")
  plan = plan or plan_for(pipe)
  shape = (b,) + pipe.latent_shape(height, width)
  k_noise, k_image, k_solver = jax.random.split(jax.random.key(seed), 3)
  noise = jax.random.normal(k_noise, shape) if noise is None else jnp.asarray(noise, jnp.float32)
  if noise.shape != shape:
    raise ValueError(f"noise has shape {noise.shape}, expected {shape}")
  ids, mask = pipe.tokenize_checked(prompts)
  neg_ids, neg_mask = pipe.tokenize_checked(negative)
  record = {"prompts": prompts, "negative_prompts": negative, "height": height, "width": width, "seed": seed,
            "guidance_scale": float(guidance_scale), "guidance": dataclasses.asdict(guidance), "plan": plan.record()}
  key = (plan.name, plan.options, plan.denoise_final, guidance)
  if image is None:
    run = _program(pipe, "txt2img", *key)
    latents = run(params, ids, mask, neg_ids, neg_mask, noise, jnp.asarray(plan.ts), jnp.float32(guidance_scale),
                  k_solver, init_scale=jnp.float32(plan.init_scale))
  else:
    if pipe.encode_image is None:
      raise ValueError("img2img needs a pipeline with an image encoder (a VAE)")
    pixels = _check_image(image, height, width, 3)
    if pixels.shape[0] not in (1, b):
      raise ValueError(f"{pixels.shape[0]} init images for {b} prompts: give one or {b}")
    pixels = np.broadcast_to(pixels, (b,) + pixels.shape[1:])
    image_noise = jax.random.normal(k_image, shape) if image_noise is None else jnp.asarray(image_noise, jnp.float32)
    if image_noise.shape != shape:
      raise ValueError(f"image_noise has shape {image_noise.shape}, expected {shape}")
    image_latents = _encoder(pipe)(params, jnp.asarray(2.0 * pixels - 1.0), image_noise)
    n = len(plan.ts) - (0 if plan.denoise_final else 1)  # the points where the network is evaluated
    start = core.strength_start(n, strength)
    record |= {"task": "img2img", "strength": float(strength), "first_step": start}
    run = _program(pipe, "img2img", *key)
    latents = run(params, ids, mask, neg_ids, neg_mask, image_latents, noise, jnp.asarray(plan.ts[start:]),
                  jnp.float32(guidance_scale), k_solver)
  record.setdefault("task", "txt2img")
  out = latents if pipe.decode is None else _decoder(pipe)(params, latents)
  images = np.clip(np.asarray(out, np.float32) / 2.0 + 0.5, 0.0, 1.0)
  return Output(images=images, latents=np.asarray(latents), record=record)
