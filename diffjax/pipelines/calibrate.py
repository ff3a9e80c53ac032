"""Fitted samplers for a pipeline: calibration noise with prompts, guided as the pipeline samples.

``calibrate`` draws calibration noise and prompts, builds the guided denoiser the txt2img task
runs (classifier-free guidance against the negative prompt, or the pipeline's default negative)
and hands both to ``samplers.calibration.calibrate``, which solves the reference paths, fits a
sampler per budget and writes the keyed file. ``fitted_plan`` turns a fitted sampler into a
``Plan`` that every task runs (``Plan.custom_solver``). The trainer (``--mode=calibrate`` of a
training config) and the generation job (of a generation config) both call these.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from diffjax.pipelines import core, programs
from diffjax.pipelines.schedulers import Plan
from diffjax.processes import Process
from diffjax.samplers import calibration
from diffjax.samplers.calibration import FITTED
from diffjax.samplers.optimized_grids import FittedSampler

NO_OPTIONS = core.Guidance()  # plain classifier-free guidance (no interval, no rescale)


def guided_denoiser(pipe: core.Pipeline, params, guidance_scale: float, negative_prompt: str = "",
                    options: core.Guidance = NO_OPTIONS):
  """``denoise(x, t, context) -> x0_hat`` guided by ``guidance_scale`` against ``negative_prompt`` (the empty
  one, or the pipeline's ``default_negative`` when it has one and no negative prompt is given), as txt2img
  samples; contexts from ``prompted_noise``."""
  negative = None
  if negative_prompt or pipe.default_negative is None:
    negative = jax.jit(pipe.encode_text)(params, *pipe.tokenize_checked([negative_prompt]))

  def denoise(x, t, context):
    neg = pipe.default_negative(context) if negative is None else negative
    return core.denoiser(pipe, params, context, neg, guidance_scale, options)(x, t)

  return denoise


def prompted_noise(pipe: core.Pipeline, params, prompts: Sequence[str], seed: int, index: int, n: int, *,
                   height: int, width: int):
  """(noise (n, h, w, c) standard normal, encoded prompts (n, ...)): each sample's prompt drawn uniformly from
  ``prompts``, both from ``fold_in(key(seed), index)``."""
  if not prompts:
    raise ValueError("calibration needs prompts to draw from")
  k_noise, k_prompt = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
  which = np.asarray(jax.random.randint(k_prompt, (n,), 0, len(prompts)))
  context = jax.jit(pipe.encode_text)(params, *pipe.tokenize_checked([prompts[j] for j in which]))
  return jax.random.normal(k_noise, (n,) + pipe.latent_shape(height, width)), context


def settings_from(cal) -> dict:
  """``calibration.calibrate``'s settings from a config's ``calibration`` section: ``lattice``, ``tol``, ``chunk``,
  ``restarts`` (default 1), ``refine`` (Levenberg-Marquardt iterations; default 0) and ``minutes`` (the time
  bound; 0 or absent: none)."""
  minutes = float(cal.get("minutes") or 0.0)
  return dict(lattice=cal.lattice, tol=cal.tol, chunk=cal.chunk, restarts=int(cal.get("restarts") or 1),
              refine_iterations=int(cal.get("refine") or 0), time_budget_s=60.0 * minutes if minutes > 0 else None)


def calibrate(pipe: core.Pipeline, params, prompts: Sequence[str], path: str, *, key: dict, guidance_scale: float,
              height: int, width: int, budgets, batch: int, validation_batch: int, seed: int, negative_prompt: str = "",
              options: core.Guidance = NO_OPTIONS, log=print, **settings) -> dict:
  """Fits a sampler per budget to ``pipe`` guided as txt2img samples; writes (and resumes) ``path``.

  ``batch`` and ``validation_batch`` noises (seed ``seed``, indices 0 and 1: never an evaluation's)
  with prompts drawn from ``prompts``; ``settings``: ``calibration.calibrate``'s (lattice, tol,
  chunk, ...). ``key`` names what the file is valid for (``calibration.load_fitted`` checks it).
  """
  denoise = guided_denoiser(pipe, params, guidance_scale, negative_prompt, options)
  draw = lambda index, n: prompted_noise(pipe, params, prompts, seed, index, n, height=height, width=width)
  (x_fit, c_fit), (x_val, c_val) = draw(0, batch), draw(1, validation_batch)
  return calibration.calibrate(pipe.process, denoise, x_fit, x_val, budgets, key=key, path=path, cond_fit=c_fit,
                               cond_val=c_val, log=log, **settings)


def fitted_plan(process: Process, path: str, key: dict, nfe: int) -> Plan:
  """The ``Plan`` of the sampler fitted for ``nfe`` evaluations in the calibration file ``path`` made under
  ``key`` (``CalibrationError`` naming the field that differs, or the missing budget)."""
  fitted: FittedSampler = calibration.load_fitted(path, key, nfe)
  # the options name the file and its coefficients (programs stored on disk are keyed by them)
  return Plan(fitted.solver(process), fitted.ts, False, float(process.prior_std), FITTED,
              (("calibration", path), ("sha256", programs.fingerprint(fitted.to_dict()))))
