"""Inversion (image -> noise): the probability-flow ODE integrated towards noise with any ODE solver.

"DDIM inversion" is the DDIM step run on the reversed grid; here any deterministic diffjax
solver runs on it (``ddim``, ``dpmpp_2m``, ``heun``, ...), since a solver step from t to
t' does not care which of the two is noisier. The clean latents are taken as the state at
the grid's least noisy time (its last point), which is what DDIM inversion does; that time
is the scheduler's first timestep (sigma ~ 0.03 for SD) or a diffjax grid's minimum.

The result, divided by the plan's ``init_scale``, is the standard-normal noise that
``txt2img`` with the same plan, prompt and guidance maps back to the latents, up to the
solvers' discretisation error (tests/test_pipelines_inversion.py checks both directions
against the closed-form flow of Gaussian data). Watermark detection and editing build on it.

With a VAE the image's latents come from the encoder, which is not the decoder's inverse: on the shapes
VAE, encode(decode(z)) is 63% away from z (relative norm), and inverting the encoder's latents recovers
nothing of a latent mark (median score 0.5, against 10 from the exact latents). ``decoder_steps`` refines
them by gradient descent on the decoder's pixel error first (``decoder_inversion``; the decoder inversion of
Hong et al., "On Exact Inversion of DPM-Solvers", 2024): on the shapes LDM 100 steps raised the share of clean
marked images found at p < 1e-3 from 0 to 0.67 (benchmarks/README.md, the watermark section).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffjax.pipelines import core, programs
from diffjax.pipelines.generate import _check_image, _encoder, batched, given_or, plan_for, request, solver_for
from diffjax.pipelines.schedulers import Plan
from diffjax.samplers import Solver

_PLAIN = core.Guidance()


def invert(pipe: core.Pipeline, params, ids, mask, negative_ids, negative_mask, latents, ts, guidance_scale, *,
           solver: Solver, options: core.Guidance = _PLAIN):
  """The state (B, h, w, c) at ts[-1] reached from ``latents`` at ts[0] by the guided probability-flow ODE.

  Args:
    latents: (B, h, w, c) clean latents (or pixels), in the network's scaling.
    ts: (N,) process times, noise *increasing* (a sampling grid reversed).
    solver: a deterministic solver. Other arguments as in ``core.txt2img``.
  """
  return core._sample_from(pipe, params, ids, mask, negative_ids, negative_mask, latents, ts, guidance_scale, None,
                           solver=solver, denoise_final=False, options=options, decode=False)


@functools.lru_cache(maxsize=16)
def _program(pipe: core.Pipeline, name: str, options: tuple, guidance: core.Guidance, custom=None):
  return programs.program(pipe, functools.partial(invert, pipe, solver=solver_for(pipe, name, options, custom),
                                                  options=guidance), "invert", name, options, guidance)


def decoder_inversion(pipe: core.Pipeline, params, images, latents, steps: int, learning_rate: float = 0.1):
  """Latents whose decoding is closer to ``images``: Adam on each image's mean squared pixel error.

  Args:
    images: (B, H, W, C) in [-1, 1]; latents: (B, h, w, c) the start (the encoder's), in the network's scaling.
    steps: Adam steps; the learning rate decays from ``learning_rate`` to 0 on a cosine (so the iterates settle
      instead of circling the minimum at the step size).
  Returns:
    (latents (B, h, w, c): each image's best iterate, the start included, so no image's pixel error rises;
    (B,) RMS pixel error of the start; (B,) of the result). The images are independent (the decoder's
    normalisations are per image), so one batch is B separate problems.
  """
  if pipe.decode is None:
    raise ValueError("decoder inversion needs a pipeline with a decoder (a VAE); this one works in pixel space")
  if steps < 1:
    raise ValueError(f"decoder inversion needs steps >= 1, got {steps}")
  run = _decoder_inversion_program(pipe, int(steps))
  return run(params, jnp.asarray(images, jnp.float32), jnp.asarray(latents, jnp.float32), jnp.float32(learning_rate))


@functools.lru_cache(maxsize=8)
def _decoder_inversion_program(pipe: core.Pipeline, steps: int):
  def per_image_mse(params, images, z):
    return jnp.mean(jnp.square(pipe.decode(params, z) - images), axis=(1, 2, 3))

  def run(params, images, z0, learning_rate):
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def total(z):  # summed over the images: image i's gradient is its own
      mse = per_image_mse(params, images, z)
      return jnp.sum(mse), mse

    # The losses come with the gradient (one forward pass a step): each iterate is scored before the step that
    # leaves it, the last one after the loop.
    loss_and_grad = jax.value_and_grad(total, has_aux=True)

    def keep_better(best_z, best, z, loss):
      better = loss < best
      return jnp.where(better[:, None, None, None], z, best_z), jnp.where(better, loss, best)

    def step(carry, _):
      z, opt_state, best_z, best = carry
      (_, loss), grad = loss_and_grad(z)
      best_z, best = keep_better(best_z, best, z, loss)
      updates, opt_state = tx.update(grad, opt_state)
      return (optax.apply_updates(z, updates), opt_state, best_z, best), loss

    (z, _, best_z, best), losses = jax.lax.scan(step, (z0, tx.init(z0), z0, jnp.full(z0.shape[:1], jnp.inf)), None,
                                                length=steps)
    best_z, best = keep_better(best_z, best, z, per_image_mse(params, images, z))
    return best_z, jnp.sqrt(losses[0]), jnp.sqrt(best)

  return programs.program(pipe, run, "decoder_inversion", steps)


@dataclasses.dataclass
class Inverted:
  """noise: float32 (B, h, w, c), standard normal if the image came from the plan; latents: the
  encoded image (B, h, w, c); record: JSON-ready."""

  noise: np.ndarray
  latents: np.ndarray
  record: dict


def invert_images(pipe: core.Pipeline, params, image, prompts: str | Sequence[str] = "", *, height: int, width: int,
                  negative_prompts=None, plan: Plan | None = None, guidance_scale: float = 1.0,
                  guidance: core.Guidance | None = None, image_noise=None, decoder_steps: int = 0,
                  decoder_learning_rate: float = 0.1) -> Inverted:
  """Images -> the initial noise of ``plan`` (default the folder's scheduler, 50 steps) that generates them.

  Args:
    image: (B, H, W, C) or (H, W, C) float in [0, 1], H x W = height x width; C = 3 for a latent pipeline,
      the network's channels for a pixel-space one.
    prompts: one per image (or one string for all); the empty prompt by default.
    guidance_scale: 1 (the conditional flow alone, the usual choice: guided inversion drifts).
    image_noise: (B, h, w, c) VAE posterior noise; default zeros (the posterior mean).
    decoder_steps: > 0: the encoder's latents refined by that many steps of ``decoder_inversion`` (each a
      decoder forward and backward pass) before the flow is inverted; the record gets the RMS pixel errors.
  """
  guidance = guidance or core.Guidance()
  plan = plan or plan_for(pipe)
  if plan.solver.stochastic:
    raise ValueError(f"inversion needs a deterministic (ODE) solver; {plan.name!r} is stochastic")
  pixels = _check_image(image, height, width, 3 if pipe.encode_image is not None else pipe.latent_channels)
  if isinstance(prompts, str):
    prompts = [prompts] * pixels.shape[0]
  req = request(pipe, prompts, negative_prompts, 0, height, width)
  images = jnp.asarray(2.0 * batched(pixels, req.shape[0], "images") - 1.0)  # [-1, 1]
  if pipe.encode_image is None:
    latents = images
  else:
    noise = given_or(jnp.zeros(req.shape, jnp.float32), image_noise, "image_noise")
    latents = _encoder(pipe)(params, images, noise)
  refined = None
  if decoder_steps:
    latents, before, after = decoder_inversion(pipe, params, images, latents, decoder_steps, decoder_learning_rate)
    refined = {"steps": int(decoder_steps), "learning_rate": float(decoder_learning_rate),
               "pixel_rms_error": {"encoder": np.asarray(before).tolist(), "refined": np.asarray(after).tolist()}}
  ts = np.asarray(plan.ts)[::-1].copy()
  run = _program(pipe, plan.name, plan.options, guidance, plan.custom_solver)
  state = run(params, *req.tokens, latents, jnp.asarray(ts), jnp.float32(guidance_scale))
  record = {"task": "invert"} | req.record(height, width, plan, guidance_scale, guidance)
  del record["seeds"]
  if refined is not None:
    record["decoder_inversion"] = refined
  return Inverted(noise=np.asarray(state, np.float32) / plan.init_scale, latents=np.asarray(latents), record=record)
