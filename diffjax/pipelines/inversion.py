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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

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


@dataclasses.dataclass
class Inverted:
  """noise: float32 (B, h, w, c), standard normal if the image came from the plan; latents: the
  encoded image (B, h, w, c); record: JSON-ready."""

  noise: np.ndarray
  latents: np.ndarray
  record: dict


def invert_images(pipe: core.Pipeline, params, image, prompts: str | Sequence[str] = "", *, height: int, width: int,
                  negative_prompts=None, plan: Plan | None = None, guidance_scale: float = 1.0,
                  guidance: core.Guidance | None = None, image_noise=None) -> Inverted:
  """Images -> the initial noise of ``plan`` (default the folder's scheduler, 50 steps) that generates them.

  Args:
    image: (B, H, W, C) or (H, W, C) float in [0, 1], H x W = height x width; C = 3 for a latent pipeline,
      the network's channels for a pixel-space one.
    prompts: one per image (or one string for all); the empty prompt by default.
    guidance_scale: 1 (the conditional flow alone, the usual choice: guided inversion drifts).
    image_noise: (B, h, w, c) VAE posterior noise; default zeros (the posterior mean).
  """
  guidance = guidance or core.Guidance()
  plan = plan or plan_for(pipe)
  if plan.solver.stochastic:
    raise ValueError(f"inversion needs a deterministic (ODE) solver; {plan.name!r} is stochastic")
  pixels = _check_image(image, height, width, 3 if pipe.encode_image is not None else pipe.latent_channels)
  if isinstance(prompts, str):
    prompts = [prompts] * pixels.shape[0]
  req = request(pipe, prompts, negative_prompts, 0, height, width)
  pixels = batched(pixels, req.shape[0], "images")
  if pipe.encode_image is None:
    latents = jnp.asarray(2.0 * pixels - 1.0)
  else:
    noise = given_or(jnp.zeros(req.shape, jnp.float32), image_noise, "image_noise")
    latents = _encoder(pipe)(params, jnp.asarray(2.0 * pixels - 1.0), noise)
  ts = np.asarray(plan.ts)[::-1].copy()
  run = _program(pipe, plan.name, plan.options, guidance, plan.custom_solver)
  state = run(params, *req.tokens, latents, jnp.asarray(ts), jnp.float32(guidance_scale))
  record = {"task": "invert"} | req.record(height, width, plan, guidance_scale, guidance)
  del record["seeds"]
  return Inverted(noise=np.asarray(state, np.float32) / plan.init_scale, latents=np.asarray(latents), record=record)
