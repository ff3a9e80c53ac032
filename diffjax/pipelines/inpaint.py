"""Inpainting: regenerate the masked region of an image, keep the rest.

Two ways, as pure jit-compatible task functions in the style of ``core.txt2img``:

* ``inpaint_conditioned``: a network trained for it (SD's inpainting U-Net, 9 input
  channels) sees ``[x, mask, masked-image latents]`` at every evaluation, both CFG
  branches alike. The pipeline is an ``InpaintingPipeline``.
* ``inpaint_blended``: any network. After every solver step the known region is replaced
  by the image's latents noised to the step's end time with the run's own initial noise,
  x <- m x + (1 - m) (alpha(t') x0 + sigma(t') noise), and by the clean latents at the end
  (Avrahami et al. 2023, "Blended latent diffusion"; what diffusers' inpainting pipeline
  does for a 4-channel U-Net). With ``RePaint`` options it resamples (Lugmayr et al. 2022):
  the path goes back up the grid by the forward process and down again, so the
  generated region has time to agree with the known one.

``inpaint`` is the host-side entry (``generate.generate``'s counterpart): it validates the
image and mask, binarizes the mask, encodes, runs one compiled program per mode and
solver and returns ``generate.Output``.

Conventions: NHWC; ``region`` (B, h, w, 1) is 1 where the image is regenerated and 0
where it is kept (diffusers' convention; RePaint's paper uses the opposite); image latents
are scaled as the network expects (``Pipeline.encode_image``); times are process times.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import watermark as wm
from diffjax.pipelines import core, programs
from diffjax.pipelines.generate import (
  Output,
  _check_image,
  _encoder,
  batched,
  finish,
  first_step,
  given_or,
  on_mesh,
  plan_for,
  request,
  solver_for,
)
from diffjax.pipelines.schedulers import Plan
from diffjax.samplers import Solver
from diffjax.samplers.base import schedule_at

Array = jax.Array
Guidance = core.Guidance
_PLAIN = Guidance()  # guidance without rescale or interval


@dataclasses.dataclass(frozen=True, eq=False)
class InpaintingPipeline(core.Pipeline):
  """A ``Pipeline`` whose network is conditioned on the mask and the masked image (SD inpainting).

  ``predict`` takes ``x`` (B, h, w, 2c + 1) = concat([latents (c), region (1), masked-image
  latents (c)]) in that channel order; ``latent_channels`` is c, that of the VAE. Other
  fields as in ``Pipeline``.
  """

  entry: ClassVar[str] = "inpaint"


@dataclasses.dataclass(frozen=True)
class RePaint:
  """RePaint resampling (Lugmayr et al. 2022, Algorithm 1 and the jump schedule of its section 4.2).

  Attributes:
    jump_length: grid intervals a jump goes back up (the paper's j; 10 in its experiments).
    jump_n_sample: how often each jump point is passed going down (the paper's r; 10).
  """

  jump_length: int = 10
  jump_n_sample: int = 10

  def __post_init__(self):
    if self.jump_length < 1 or self.jump_n_sample < 1:
      raise ValueError(f"RePaint needs jump_length >= 1 and jump_n_sample >= 1, got {self}")


def repaint_schedule(num_points: int, repaint: RePaint) -> np.ndarray:
  """Indices into a grid of ``num_points`` (0 noisiest) that a RePaint run visits, in order.

  The walk goes down one grid point at a time from 0 to ``num_points - 1``. The jump
  points are ``num_points - 1``, ``num_points - 1 - L``, ... down to index L (L =
  ``jump_length``); on reaching one, the walk goes back up L points (one forward-noising
  transition each) and down again, ``jump_n_sample - 1`` times, before it goes on. So
  every index below a jump point is visited ``jump_n_sample`` times as often as the
  others, and a run makes (N - 1) + (jump points) (r - 1) L down steps. Returns (M + 1,)
  int: consecutive entries differ by one; the first is 0 and the last ``num_points - 1``.
  (diffusers' RePaintScheduler also jumps from the clean sample; here the final jump to
  sigma = 0 stays the last step.)
  """
  length, repeats = repaint.jump_length, repaint.jump_n_sample
  left = {j: repeats - 1 for j in range(num_points - 1, length - 1, -length)}
  path, i = [0], 0
  while i < num_points - 1:
    i += 1
    path.append(i)
    if left.get(i, 0) > 0:
      left[i] -= 1
      path.extend(range(i - 1, i - length - 1, -1))
      i -= length
  return np.asarray(path, np.int32)


# ----------------------------------------------------------------------------------
# Solver wrappers: what happens to the known region between the solver's steps.
# ----------------------------------------------------------------------------------
def _blend(region, x, known):
  return (region * x + (1.0 - region) * known).astype(x.dtype)


def blended_solver(solver: Solver, process, image_latents, region, noise, clean_at=None) -> Solver:
  """``solver`` followed by x <- m x + (1 - m) (alpha(t') x0 + sigma(t') noise) after each step.

  ``noise`` is the fixed (B, h, w, c) standard normal the known region is noised with at
  every step; at time ``clean_at`` (a grid point, or None) the clean x0 is pasted instead
  (diffusers pastes it after its last step even when that lands at alpha < 1). Any
  solver's state passes through unchanged: multistep history keeps its denoiser outputs,
  the next step starts from the blended x.
  """

  def step(denoise, x, t, t_next, state, key):
    x, state = solver.step(denoise, x, t, t_next, state, key)
    alpha, sigma, _ = schedule_at(process, t_next)
    if clean_at is not None:
      last = t_next == clean_at
      alpha, sigma = jnp.where(last, 1.0, alpha), jnp.where(last, 0.0, sigma)
    return _blend(region, x, alpha * image_latents + sigma * noise), state

  return solver._replace(step=step)


def repaint_solver(solver: Solver, process, image_latents, region) -> Solver:
  """RePaint's step along a path that goes down and up a grid (``repaint_schedule``).

  Going down (t' less noisy than t): one ``solver`` step for the whole x, then the known
  region replaced by a fresh sample of q(x_t' | x0) = N(alpha' x0, sigma'^2) (Algorithm 1,
  lines 4-8). Going up: the forward transition q(x_t' | x_t) = N((alpha'/alpha) x,
  sigma'^2 - (alpha' sigma / alpha)^2) of the whole x (line 10). The solver restarts at
  every down step (``init`` on the two times): the jumps break a multistep history, so a
  multistep solver runs as its first-order start. Always stochastic (needs a key).
  """

  def step(denoise, x, t, t_next, state, key):
    k_solver, k_noise = jax.random.split(key)
    alpha, sigma, lam = schedule_at(process, t)
    alpha_n, sigma_n, lam_n = schedule_at(process, t_next)
    z = jax.random.normal(k_noise, x.shape, x.dtype)

    def down():
      pair = jnp.stack([t, t_next])
      y, _ = solver.step(denoise, x, t, t_next, solver.init(x, pair), k_solver)
      return _blend(region, y, alpha_n * image_latents + sigma_n * z)

    def up():
      ratio = alpha_n / alpha
      return (ratio * x + jnp.sqrt(jnp.maximum(sigma_n**2 - (ratio * sigma) ** 2, 0.0)) * z).astype(x.dtype)

    return jax.lax.cond(lam_n > lam, down, up), state

  return Solver(init=lambda x, ts: (), step=step, order=solver.order, nfe_per_step=solver.nfe_per_step,
                stochastic=True, warmup_nfe=solver.warmup_nfe)


# ----------------------------------------------------------------------------------
# Pure, jit-compatible task functions.
# ----------------------------------------------------------------------------------
def latent_region(mask: Array, downsample: int) -> Array:
  """Pixel mask (B, H, W, 1) in [0, 1] -> binary region (B, H / f, W / f, 1), 1 = regenerate.

  Binarized at 0.5 (>= 0.5 is 1) and downsampled by taking every f-th pixel from the
  first, which is torch's nearest interpolation for an integer factor (diffusers'
  ``prepare_mask_latents``); ``jax.image.resize('nearest')`` picks other pixels.
  """
  m = (mask >= 0.5).astype(jnp.float32)
  return m[:, ::downsample, ::downsample, :]


def masked_image(images: Array, mask: Array) -> Array:
  """Images (B, H, W, C) in [-1, 1] with the region to regenerate (mask >= 0.5) set to 0 (diffusers')."""
  return images * (mask < 0.5).astype(images.dtype)


def _start(pipe: core.Pipeline, image_latents, noise, t0, init_scale):
  """The state at t0: ``init_scale * noise`` (strength 1), else ``image_latents`` noised to t0."""
  if init_scale is not None:
    return init_scale * noise
  return (pipe.process.alpha(t0) * image_latents + pipe.process.sigma(t0) * noise).astype(noise.dtype)


def inpaint_conditioned(pipe: InpaintingPipeline, params, ids, mask, negative_ids, negative_mask, image_latents,
                        masked_latents, region, noise, ts, guidance_scale, key=None, *, solver: Solver,
                        init_scale=None, denoise_final: bool = True, options: Guidance = _PLAIN,
                        decode: bool = True):
  """Inpainting with a mask-conditioned network: images (B, H, W, C) in [-1, 1] (latents with ``decode=False``).

  Args:
    pipe: an ``InpaintingPipeline``.
    ids, mask: (B, L) prompt tokens; negative_ids, negative_mask: (B or 1, L).
    image_latents: (B, h, w, c) latents of the image, the start at strength < 1 (None with ``init_scale``).
    masked_latents: (B, h, w, c) latents of ``masked_image``; region: (B, h, w, 1) binary (``latent_region``).
    noise: (B, h, w, c) standard normal; ts: (N,) process times from the strength's first point on.
    init_scale: strength 1: the start is ``init_scale * noise``; None: ``image_latents`` noised to ts[0].
    Other arguments as in ``core.txt2img``. Every evaluation sees ``[x, region, masked_latents]``, x in
    process coordinates, which is diffusers' ``scheduler.scale_model_input`` of its latents.
  """
  extra = jnp.concatenate([region, masked_latents], axis=-1).astype(noise.dtype)

  def predict(p, x, t, cond):
    context, channels = cond
    return pipe.predict(p, jnp.concatenate([x, channels.astype(x.dtype)], axis=-1), t, context)

  # The condition channels ride in the conditioning pytree: CFG batches both branches with them.
  net = dataclasses.replace(pipe, predict=predict,
                            encode_text=lambda p, i, m: (pipe.encode_text(p, i, m), extra))
  x = _start(pipe, image_latents, noise, ts[0], init_scale)
  return core._sample_from(net, params, ids, mask, negative_ids, negative_mask, x, ts, guidance_scale, key,
                           solver=solver, denoise_final=denoise_final, options=options, decode=decode)


def inpaint_blended(pipe: core.Pipeline, params, ids, mask, negative_ids, negative_mask, image_latents, region, noise,
                    ts, guidance_scale, key=None, *, solver: Solver, init_scale=None, denoise_final: bool = True,
                    options: Guidance = _PLAIN, decode: bool = True, repaint: RePaint | None = None):
  """Training-free inpainting with any network: images (B, H, W, C) in [-1, 1] (latents with ``decode=False``).

  After every step of ``solver`` the known region (``region`` = 0) is the image's latents
  noised to the step's end with ``noise`` (``blended_solver``), or, with ``repaint``, the
  RePaint path (``repaint_schedule``, ``repaint_solver``; needs ``key``). The result's
  known region is ``image_latents`` exactly.

  Args:
    image_latents: (B, h, w, c) latents of the whole image; region: (B, h, w, 1) binary.
    noise: (B, h, w, c) standard normal: the start and the noise of the known region.
    Other arguments as in ``inpaint_conditioned``.
  """
  x = _start(pipe, image_latents, noise, ts[0], init_scale)
  if repaint is None:
    run = blended_solver(solver, pipe.process, image_latents, region, noise, None if denoise_final else ts[-1])
    path = ts
  else:
    if key is None:
      raise ValueError("RePaint is stochastic: pass key=jax.random.key(seed)")
    run = repaint_solver(solver, pipe.process, image_latents, region)
    path = ts[repaint_schedule(ts.shape[0], repaint)]
  x = core._sample_from(pipe, params, ids, mask, negative_ids, negative_mask, x, path, guidance_scale, key,
                        solver=run, denoise_final=denoise_final, options=options, decode=False)
  x = _blend(region, x, image_latents)
  return pipe.decode(params, x) if decode and pipe.decode is not None else x


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _program(pipe: core.Pipeline, conditioned: bool, name: str, options: tuple, denoise_final: bool,
             guidance: core.Guidance, repaint: RePaint | None, custom=None):
  """One jitted program per (pipeline, mode, solver, final jump, guidance, RePaint); grids and scales are traced."""
  fn = inpaint_conditioned if conditioned else functools.partial(inpaint_blended, repaint=repaint)
  return programs.program(pipe, functools.partial(fn, pipe, solver=solver_for(pipe, name, options, custom),
                                                  denoise_final=denoise_final, options=guidance, decode=False),
                          "inpaint", conditioned, name, options, denoise_final, guidance, repaint)


def _check_mask(mask, height: int, width: int) -> np.ndarray:
  """(B, H, W, 1) float32 of a (B, H, W, 1), (H, W, 1) or (H, W) mask in [0, 1] (bool allowed)."""
  mask = np.asarray(mask)
  if mask.ndim == 2:
    mask = mask[..., None]
  if mask.ndim == 3:
    mask = mask[None]
  if mask.ndim != 4 or mask.shape[-1] != 1:
    raise ValueError(f"mask must be single-channel: (B, H, W, 1), (H, W, 1) or (H, W), got shape {mask.shape}")
  if mask.shape[1:3] != (height, width):
    raise ValueError(f"mask is {mask.shape[1]} x {mask.shape[2]}, the image {height} x {width}: give one of its size")
  if mask.dtype != bool and (not np.issubdtype(mask.dtype, np.floating) or mask.min() < 0.0 or mask.max() > 1.0):
    raise ValueError("mask must be bool or float in [0, 1] (1 = regenerate, binarized at 0.5)")
  return mask.astype(np.float32)


def inpaint(pipe: core.Pipeline, params, prompts, image, mask, *, negative_prompts=None, height: int, width: int,
            plan: Plan | None = None, guidance_scale: float = 7.5, guidance: core.Guidance | None = None,
            seed: int | Sequence[int] = 0, noise=None, image_noise=None, strength: float = 1.0,
            repaint: RePaint | None = None, watermark: wm.Watermark = wm.DEFAULT,
            mesh: jax.sharding.Mesh | None = None) -> Output:
  """Inpaint ``image`` where ``mask`` is set, one image per prompt.

  An ``InpaintingPipeline`` (a 9-channel SD inpainting folder) runs ``inpaint_conditioned``;
  any other pipeline ``inpaint_blended`` (with RePaint resampling when ``repaint`` is given).

  Args:
    prompts: B prompts; negative_prompts: B (or one) negative prompts; None: the empty prompt.
    image: (B or 1, H, W, 3) or (H, W, 3) float in [0, 1], H x W = height x width.
    mask: (B or 1, H, W, 1), (H, W, 1) or (H, W), bool or float in [0, 1]; >= 0.5 is regenerated.
    plan, guidance_scale, guidance, seed: as in ``generate.generate``.
    noise: (B, h, w, c) standard normal initial noise.
    image_noise: (2, B, h, w, c) standard normal: the VAE posterior noise of the image [0]
      (encoded for the blended mode and for strength < 1) and of the masked image [1]
      (the conditioned mode's input).
    strength: in (0, 1]; 1 starts from pure noise, less from the image noised to the
      strength's first grid point (diffusers' rounding, ``core.strength_start``).
    repaint: ``RePaint`` options for the blended mode (None: no resampling).
    watermark: the pixel mark every image carries (``diffjax.watermark``; the latent mark is txt2img's).
    mesh: as in ``generate.generate``: the images split over its devices.
  """
  guidance = guidance or core.Guidance()
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  if pipe.encode_image is None:
    raise ValueError("inpainting needs a pipeline with an image encoder (a VAE)")
  conditioned = isinstance(pipe, InpaintingPipeline)
  if conditioned and repaint is not None:
    raise ValueError("repaint is an option of training-free inpainting; this pipeline's network is mask-conditioned")
  plan = plan or plan_for(pipe)
  req = request(pipe, prompts, negative_prompts, seed, height, width)
  b = req.shape[0]
  pixels = batched(_check_image(image, height, width, 3), b, "images")
  pixel_mask = jnp.asarray(batched(_check_mask(mask, height, width), b, "masks"))
  noise = given_or(req.draws[0], noise, "noise")
  image_noise = given_or(jnp.stack(req.draws[1:]), image_noise, "image_noise (image, masked image)")
  params, tokens, pixels, pixel_mask, noise, image_noise = on_mesh(mesh, b, params, req.tokens, pixels, pixel_mask,
                                                                   noise, tuple(image_noise))

  images = 2.0 * jnp.asarray(pixels) - 1.0
  region = latent_region(pixel_mask, pipe.downsample)
  encode = _encoder(pipe)
  image_latents = encode(params, images, image_noise[0]) if strength < 1.0 or not conditioned else None
  start = first_step(plan, strength)
  ts = jnp.asarray(plan.ts[start:])
  init_scale = jnp.float32(plan.init_scale) if strength == 1.0 else None
  run = _program(pipe, conditioned, plan.name, plan.options, plan.denoise_final, guidance, repaint, plan.custom_solver)
  inputs = (image_latents,)
  if conditioned:
    inputs += (encode(params, masked_image(images, pixel_mask), image_noise[1]),)
  latents = run(params, *tokens, *inputs, region, noise, ts, jnp.float32(guidance_scale), req.solver_key,
                init_scale=init_scale)
  record = {"task": "inpaint", "mode": "conditioned" if conditioned else "blended"}
  record |= req.record(height, width, plan, guidance_scale, guidance)
  record |= {"strength": float(strength), "first_step": start,
             "repaint": None if repaint is None else dataclasses.asdict(repaint)}
  return finish(pipe, params, latents, record, watermark)
