"""The pipeline: text (and an image) -> images, for any network, process, solver and VAE.

A ``Pipeline`` is the model side of generation without its parameters: tokenizer,
text encoder, the denoiser network with its prediction target, the noise process and
an optional VAE, each as a pure function of a parameter pytree. It is built from a
diffjax training run (``diffjax.train.trainer``) or from a Stable Diffusion folder
(``diffjax.pipelines.folders``). The task functions below are pure and
jit-compatible (``jax.jit`` them with shardings to run on a mesh); ``generate`` is the
host-side entry point that tokenizes, jits once per task and solver, and returns images.

Coordinates: latents and noise are NHWC; ``noise`` is standard normal and the initial
state is ``plan.init_scale * noise``; images are NHWC in the data range [-1, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffjax import parameterization
from diffjax.processes import Process
from diffjax.samplers import Solver, guidance, sample

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance options (``samplers.guidance.classifier_free``).

  Attributes:
    rescale: phi of Lin et al. (2024): the guided prediction of the network's target (eps
      or v, as diffusers' ``guidance_rescale``) is rescaled to the conditional one's
      standard deviation, mixed with weight phi (0: off).
    interval: (sigma_lo, sigma_hi) in EDM sigma: guide only inside (None: everywhere).
  """

  rescale: float = 0.0
  interval: tuple | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
  """Tokenizer, text encoder, network, process and optional VAE, without parameters.

  Attributes:
    tokenize: prompts (list of str) -> (ids, mask), int32 numpy (B, L) (SDXL: (B, 2, L), one row
      per tokenizer); over-long prompts are truncated (``tokenize_checked`` logs it).
    encode_text: ``(params, ids, mask) -> context`` (B, L, D), the cross-attention input, or a
      pytree of such (B, ...) arrays that ``predict`` reads (SDXL: (context, pooled)). The tasks
      encode prompts and negative prompts in one call; a leaf whose batch is not the ids' is a
      per-image input that both guidance branches share (inpainting's mask channels).
    predict: ``(params, x (B, h, w, c), t_net (B,), context) -> prediction of target``.
    process: the noise process; the network sees time ``time_scale * t``.
    target: what the network predicts (``parameterization.TARGETS``: eps, v, x0 ...).
    latent_channels: channels of the denoised space (c).
    downsample: image size / latent size (1 in pixel space, 8 for SD's VAE).
    decode: ``(params, latents) -> images`` (B, H, W, C) in [-1, 1]; None in pixel space.
    encode_image: ``(params, images, noise) -> latents``, the posterior sample
      mean + std * noise (noise standard normal of the latent shape), scaled as the network expects.
    scheduler: the scheduler a pretrained folder names (``schedulers.DiffusersScheduler``).
    max_length: the tokenizer's sequence length.
    count_tokens: prompt -> number of ids before truncation (None: unknown).
    default_negative: ``conditioning -> negative conditioning`` (same structure and batch) used
      when no negative prompt is given: the tasks get ``negative_ids=None`` (SDXL's
      ``force_zeros_for_empty_prompt``: zeros). None: no negative prompt means the empty one.
    fingerprint: ``programs.fingerprint`` of everything but the parameters that decides the
      pipeline's compiled programs (set by the loaders); None: programs are not stored on disk.
    embedded_guidance: the network takes the guidance scale as an input (guidance-distilled FLUX.1
      [dev]): ``predict`` gets ``(conditioning, scale)`` and no classifier-free branch runs, so no
      negative prompt is taken.
  """

  tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
  encode_text: Callable[..., Array]
  predict: Callable[..., Array]
  process: Process
  target: str
  latent_channels: int
  downsample: int = 1
  time_scale: float = 1.0
  decode: Callable[..., Array] | None = None
  encode_image: Callable[..., Array] | None = None
  scheduler: Any = None
  max_length: int = 77
  count_tokens: Callable[[str], int] | None = None
  entry: ClassVar[str] = "generate"  # the host function that runs this kind (subclasses' networks take more)
  default_negative: Callable[[Any], Any] | None = None
  fingerprint: str | None = None
  embedded_guidance: bool = False

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    """(h, w, c) of the denoised space for images of height x width pixels (checked)."""
    f = self.downsample
    if height <= 0 or width <= 0 or height % f or width % f:
      raise ValueError(f"height and width must be positive multiples of {f}, got {height} x {width}")
    return height // f, width // f, self.latent_channels

  def tokenize_checked(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``tokenize`` with a warning naming every prompt the tokenizer truncates."""
    if self.count_tokens is not None:
      for i, p in enumerate(prompts):
        n = self.count_tokens(p)
        if n > self.max_length:
          logging.warning("prompt %d has %d tokens; truncated to the tokenizer's %d: %r", i, n, self.max_length, p)
    return self.tokenize(list(prompts))


# ----------------------------------------------------------------------------------
# Pure, jit-compatible pieces.
# ----------------------------------------------------------------------------------
def denoiser(pipe: Pipeline, params, context, negative_context, guidance_scale, options: Guidance = Guidance()):
  """``(x, t) -> x0_hat`` with classifier-free guidance between ``context`` and ``negative_context``.

  ``negative_context`` may have batch 1 (shared, e.g. the empty prompt). The guided
  combination is taken on x0, which equals diffusers' combination of eps or v: each is
  an affine function of x0 at fixed (x, t) with the same coefficients for both branches.
  """

  def denoise(x, t, cond):
    t_b = jnp.broadcast_to(t, x.shape[:1])
    out = pipe.predict(params, x, pipe.time_scale * t_b, cond)
    return parameterization.to_x0(pipe.target, out, x, t_b, pipe.process)

  if pipe.embedded_guidance:  # the scale is the network's input: one branch
    return lambda x, t: denoise(x, t, (context, guidance_scale))
  return guidance.classifier_free(denoise, context, negative_context, guidance_scale, process=pipe.process,
                                  interval=options.interval, rescale=options.rescale,
                                  rescale_target=pipe.target)


def _sample_from(pipe: Pipeline, params, ids, mask, negative_ids, negative_mask, x, ts, guidance_scale, key, *,
                 solver: Solver, denoise_final: bool, options: Guidance, decode: bool):
  """The shared body of the tasks: encode both prompts, sample from x at ts[0] with guidance, decode."""
  if pipe.embedded_guidance and negative_ids is not None:
    raise ValueError("this pipeline's guidance is an input of its network: it takes no negative prompt")
  if negative_ids is None:  # no negative prompt: the pipeline's own default
    if pipe.default_negative is None:
      raise ValueError("negative_ids=None needs a pipeline with a default_negative; tokenize the empty prompt")
    context = pipe.encode_text(params, ids, mask)
    negative = pipe.default_negative(context)
  else:  # one text-encoder call for both prompts: one copy of the encoder in the compiled program
    b, n = ids.shape[0], ids.shape[0] + negative_ids.shape[0]
    both = pipe.encode_text(params, jnp.concatenate([ids, negative_ids]), jnp.concatenate([mask, negative_mask]))
    # Leaves of the joint batch n split; others are per-image inputs (B,) both branches share (inpaint.py).
    context = jax.tree.map(lambda a: a[:b] if a.shape[0] == n else a, both)
    negative = jax.tree.map(lambda a: a[b:] if a.shape[0] == n else a, both)
  d = denoiser(pipe, params, context, negative, guidance_scale, options)
  x = sample(solver, d, x, ts, key=key, denoise_final=denoise_final)
  return pipe.decode(params, x) if decode and pipe.decode is not None else x


def txt2img(pipe: Pipeline, params, ids, mask, negative_ids, negative_mask, noise, ts, guidance_scale, key=None, *,
            solver: Solver, init_scale, denoise_final: bool = True, options: Guidance = Guidance(),
            decode: bool = True):
  """Images (B, H, W, C) in [-1, 1] (or latents with ``decode=False``) for tokenized prompts.

  Args:
    ids, mask: (B, L) prompt tokens; negative_ids, negative_mask: (B or 1, L), or None for the
      pipeline's ``default_negative``.
    noise: (B, h, w, c) standard normal; the initial state is ``init_scale * noise`` at ts[0].
    ts: (N,) process times; guidance_scale: scalar (traced: sweeping it does not recompile).
    key: PRNG key of stochastic solvers.
  """
  return _sample_from(pipe, params, ids, mask, negative_ids, negative_mask, init_scale * noise, ts, guidance_scale,
                      key, solver=solver, denoise_final=denoise_final, options=options, decode=decode)


def strength_start(num_points: int, strength: float) -> int:
  """Index of the first grid point an img2img run of ``strength`` visits (diffusers' rounding).

  ``init = min(int(n * strength), n)`` in Python float64 (float32 rounds differently,
  e.g. n = 50 and 0.58), start = n - init; ValueError when nothing is left to do.
  """
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  init = min(int(num_points * float(strength)), num_points)
  if init < 1:
    raise ValueError(f"strength {strength} with {num_points} steps leaves no step to run: raise either")
  return num_points - init


def img2img(pipe: Pipeline, params, ids, mask, negative_ids, negative_mask, image_latents, noise, ts,
            guidance_scale, key=None, *, solver: Solver, denoise_final: bool = True, options: Guidance = Guidance(),
            decode: bool = True):
  """SDEdit (Meng et al. 2022): ``image_latents`` noised to ts[0] with ``noise``, then sampled along ``ts``.

  ``ts`` is the grid from the strength's first point on (``strength_start``); the start is
  x = alpha(ts[0]) x0 + sigma(ts[0]) noise, what every diffusers scheduler's ``add_noise``
  gives in the process's coordinates. Other arguments as in ``txt2img``.
  """
  t0 = ts[0]
  x = (pipe.process.alpha(t0) * image_latents + pipe.process.sigma(t0) * noise).astype(noise.dtype)
  return _sample_from(pipe, params, ids, mask, negative_ids, negative_mask, x, ts, guidance_scale, key,
                      solver=solver, denoise_final=denoise_final, options=options, decode=decode)
