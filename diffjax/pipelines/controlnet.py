"""ControlNet in the generation pipelines (Zhang, Rao and Agrawala 2023): txt2img, img2img and inpainting steered by
one or several ControlNets, as diffusers' ``StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline``.

``with_controlnets(pipe, controlnets)`` wraps a Stable Diffusion ``Pipeline`` (or ``InpaintingPipeline``, or a diffjax
workdir's text-to-image pipeline): its
``predict`` runs every ControlNet on the latents (the first ``latent_channels`` channels of the network's input: an
inpainting U-Net's mask and masked-image channels are the U-Net's alone, as in diffusers), sums their residuals
(diffusers' ``MultiControlNetModel``) and hands the sum to the U-Net. Its parameters are the base pipeline's plus

* ``params['controlnet']``: one ControlNet's parameters, or a list / tuple of them in the order of ``controlnets``;
* ``params['control']``: the run's ``ControlInputs`` (control images, scales, keep schedule, guess mode), arrays that
  the compiled programs trace: another image, scale, schedule or guess mode reuses the program.

So every task and host function of the pipeline layer (``core.txt2img`` / ``img2img``, ``inpaint.inpaint_conditioned``
/ ``inpaint_blended``; ``generate.generate``, ``inpaint.inpaint``) runs it unchanged. ``generate`` and ``inpaint``
here make the ``ControlInputs`` for the grid the run visits (``control_inputs``) and add them to the record.

What diffusers does, and where it is here:

* Control images: one per ControlNet, (B or 1, H, W, 3) in [0, 1] at the output's pixel size, what its
  ``control_image_processor`` gives (resized, RGB, not normalised); a 'bgr' ControlNet flips the channels itself.
* ``controlnet_conditioning_scale`` per ControlNet, times ``keep`` (``keep_schedule``): ControlNet k acts at step i
  of the N network evaluations unless i / N < start_k or (i + 1) / N > end_k. The network sees times, not steps: i is
  the index of the nearest of the grid's evaluated times (``ControlInputs.times``), which is diffusers' step for a
  scheduler with one evaluation per timestep (DDIM, Euler, DPM-Solver multistep; PNDM evaluates its second timestep
  twice, so there diffusers' index runs one ahead after the first step).
* Guess mode (or a first ControlNet with ``global_pool_conditions``): the residuals, with the ControlNets'
  ``logspace(-1, 0)`` scales, go to the conditional rows of classifier-free guidance only; the negative prompt's
  rows get none. Which rows are conditional rides in the conditioning (``ControlRows``).

A ControlNet whose scale times keep is 0 at a step is not run there (``jax.lax.cond``; diffusers runs it and adds
zeros, the same result).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffjax.models.controlnet import ControlNet
from diffjax.pipelines import core, programs
from diffjax.pipelines import generate as generation
from diffjax.pipelines import inpaint as inpainting
from diffjax.pipelines.schedulers import Plan

Array = jax.Array


class ControlInputs(NamedTuple):
  """One run's control: ``params['control']`` of a ``with_controlnets`` pipeline (``control_inputs`` makes it).

  Attributes:
    images: per ControlNet, (B, H, W, 3) float32 in [0, 1]; B the run's prompts, H x W the output's pixels.
    scales: (K,) float32 conditioning scales (diffusers' ``controlnet_conditioning_scale``).
    keep: (K, N) float32, 1 where ControlNet k acts at the grid's i-th evaluated point, else 0 (``keep_schedule``).
    times: (N,) float32 network times (``time_scale * t``) of the grid's evaluated points, noise decreasing.
    guess_mode: () bool.
  """

  images: tuple
  scales: Array
  keep: Array
  times: Array
  guess_mode: Array


class ControlRows(NamedTuple):
  """The ControlNets' part of the conditioning, per row of the network's batch.

  Attributes:
    images: per ControlNet, (rows, H, W, 3): both guidance branches of an image see its control image.
    conditional: (rows,) bool, True on the prompts' rows and False on the negative prompts' (guess mode).
  """

  images: tuple
  conditional: Array


@dataclasses.dataclass(frozen=True)
class Control:
  """A run's ControlNet settings, as diffusers' ``StableDiffusionControlNetPipeline.__call__`` takes them.

  Attributes:
    images: one per ControlNet: (B or 1, H, W, 3) or (H, W, 3) float in [0, 1], H x W the output's size.
    scales: ``controlnet_conditioning_scale``: one for all ControlNets, or one each.
    start, end: ``control_guidance_start`` / ``_end``, fractions of the steps: one for all, or one each;
      0 <= start < end <= 1.
    guess_mode: the residuals go to the conditional branch of classifier-free guidance only, with the
      ControlNets' guess-mode scales.
  """

  images: Sequence
  scales: float | Sequence[float] = 1.0
  start: float | Sequence[float] = 0.0
  end: float | Sequence[float] = 1.0
  guess_mode: bool = False

  def per_controlnet(self) -> tuple[list[float], list[float], list[float]]:
    """(scales, start, end), one each per ControlNet, checked as diffusers' ``check_inputs`` does."""
    if isinstance(self.images, np.ndarray | jax.Array):
      raise ValueError("Control.images is one array; give a list with one control image per ControlNet")
    k = len(self.images)
    if k == 0:
      raise ValueError("Control.images is empty: give one control image per ControlNet")
    scales, start, end = (_per_controlnet(v, k, name) for v, name in
                          ((self.scales, "scales"), (self.start, "start"), (self.end, "end")))
    for i, (s, e) in enumerate(zip(start, end, strict=True)):
      if not 0.0 <= s < e <= 1.0:
        raise ValueError(f"Control start / end of ControlNet {i} are {s} / {e}: need 0 <= start < end <= 1")
    return scales, start, end

  def record(self) -> dict:
    """JSON-ready settings (not the images): scales, start, end (one per ControlNet) and guess_mode."""
    scales, start, end = self.per_controlnet()
    return {"scales": scales, "start": start, "end": end, "guess_mode": bool(self.guess_mode)}


def _per_controlnet(value, k: int, what: str) -> list[float]:
  values = [value] if np.ndim(value) == 0 else list(value)
  if len(values) not in (1, k):
    raise ValueError(f"Control.{what} has {len(values)} values for {k} ControlNets: give one or {k}")
  return [float(v) for v in values] * (k if len(values) == 1 else 1)


def keep_schedule(num_steps: int, start: Sequence[float], end: Sequence[float]) -> np.ndarray:
  """diffusers' ``controlnet_keep``: (K, num_steps) float32, ``1 - float(i / N < start_k or (i + 1) / N > end_k)``
  (Python float64 arithmetic, as diffusers computes it)."""
  n = num_steps
  return np.asarray([[1.0 - float(i / n < s or (i + 1) / n > e) for i in range(n)]
                     for s, e in zip(start, end, strict=True)], np.float32).reshape(len(start), n)


def control_inputs(control: Control, *, batch: int, height: int, width: int, ts, denoise_final: bool,
                   time_scale: float = 1.0) -> ControlInputs:
  """The ``ControlInputs`` of ``control`` for a run of ``batch`` prompts at height x width pixels on the grid ``ts``.

  Args:
    ts: (M,) the process times the task gets (img2img and inpainting: the grid from the strength's first point on).
    denoise_final: the plan's; without the final jump the last point is not evaluated (N = M - 1, else M).
    time_scale: the pipeline's (the network sees ``time_scale * t``).
  """
  scales, start, end = control.per_controlnet()
  images = tuple(jnp.asarray(generation.batched(generation._check_image(im, height, width, 3, f"control image {k}"),
                                                batch, f"control images {k}"))
                 for k, im in enumerate(control.images))
  ts = np.asarray(ts, np.float64)
  n = len(ts) - (0 if denoise_final else 1)  # the points where the network is evaluated
  times = jnp.asarray(ts[:n], jnp.float32) * time_scale  # as core.denoiser scales them
  return ControlInputs(images, jnp.asarray(scales, jnp.float32), jnp.asarray(keep_schedule(n, start, end)), times,
                       jnp.asarray(bool(control.guess_mode)))


# ----------------------------------------------------------------------------------
# Pure, jit-compatible pieces.
# ----------------------------------------------------------------------------------
def _weights(params, k: int) -> tuple:
  """``params['controlnet']`` as a tuple of k parameter trees (checked)."""
  if "controlnet" not in params:
    raise ValueError("params has no 'controlnet': a with_controlnets pipeline needs its ControlNets' parameters")
  w = params["controlnet"]
  weights = (w,) if isinstance(w, Mapping) else tuple(w)
  if len(weights) != k:
    raise ValueError(f"params['controlnet'] holds {len(weights)} ControlNets' parameters; the pipeline has {k}")
  return weights


def _inputs(params) -> ControlInputs:
  if "control" not in params:
    raise ValueError("params has no 'control': a with_controlnets pipeline's run needs its ControlInputs "
                     "(controlnet.control_inputs; controlnet.generate and controlnet.inpaint add them)")
  return params["control"]


def step_scales(control: ControlInputs, t: Array) -> Array:
  """(K,) each ControlNet's scale at network time ``t`` ((rows,), all equal): its conditioning scale times its keep
  at the step of the nearest evaluated grid point."""
  step = jnp.argmin(jnp.abs(control.times - jnp.ravel(t)[0]))
  return control.scales * control.keep[:, step]


def residuals(nets: Sequence[ControlNet], weights: Sequence, control: ControlInputs, rows: ControlRows, x: Array,
              t: Array, context: Array, pool: bool = False) -> tuple[tuple[Array, ...], Array]:
  """The summed residuals of ``nets`` for a batch of the network (diffusers' ``MultiControlNetModel``).

  Args:
    nets, weights: the ControlNets and their parameters.
    control: the run's inputs (the scales, keep schedule, grid times and guess mode are read here).
    rows: the conditioning's ``ControlRows`` for this batch.
    x: (rows, h, w, c) latents in the network's coordinates; t: (rows,) network times, equal (one step).
    context: (rows, L, D) the U-Net's cross-attention context.
    pool: the first ControlNet pools its residuals globally (diffusers then runs in guess mode).

  Returns:
    (down residuals, mid residual) as ``ControlNet.__call__`` returns them, zero on the unconditional rows in
    guess mode.
  """
  if len(nets) != len(control.images):
    raise ValueError(f"{len(control.images)} control images for {len(nets)} ControlNets: give one per ControlNet")
  scales = step_scales(control, t)
  guess = jnp.logical_or(control.guess_mode, pool)
  total = None
  for k, (net, w, image) in enumerate(zip(nets, weights, rows.images, strict=True)):
    def run(net=net, w=w, image=image, scale=scales[k]):
      return net.apply({"params": w}, x, t, context, image, scale, guess_mode=guess)

    zeros = lambda run=run: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run))
    out = jax.lax.cond(scales[k] != 0, run, zeros)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  row = jnp.where(guess, rows.conditional, True)[:, None, None, None]  # guess mode: none on the negative rows
  return jax.tree.map(lambda r: r * row.astype(r.dtype), total)


def with_controlnets(pipe: core.Pipeline, controlnets: Sequence[ControlNet]) -> core.Pipeline:
  """``pipe`` steered by ``controlnets`` (summed): a pipeline of the same kind whose parameters add
  ``params['controlnet']`` and ``params['control']`` (module docstring).

  ``pipe`` must be a U-Net pipeline whose ``predict`` takes ``residuals`` (Stable Diffusion 1.x / 2.x and SD
  inpainting folders and single files, a diffjax text-to-image workdir's); its conditioning becomes
  ``(conditioning, ControlRows)``. Build it once and reuse it: the host functions compile one program per pipeline
  object.
  """
  nets = tuple(controlnets)
  if not nets:
    raise ValueError("with_controlnets needs at least one ControlNet")
  if "residuals" not in inspect.signature(pipe.predict).parameters:
    raise ValueError(f"this {type(pipe).__name__}'s network takes no ControlNet residuals (the U-Net of a Stable "
                     f"Diffusion 1.x / 2.x pipeline or of a diffjax text-to-image workdir does)")
  pool = bool(nets[0].config.global_pool_conditions)  # diffusers: then guess mode, whatever is asked
  channels = pipe.latent_channels

  def encode_text(params, ids, mask):
    """The joint batch [prompts; negative prompts]: its first B rows (B = the control images') are conditional."""
    images = _inputs(params).images
    return pipe.encode_text(params, ids, mask), ControlRows(images, jnp.arange(ids.shape[0]) < images[0].shape[0])

  def default_negative(cond):
    inner, rows = cond
    return pipe.default_negative(inner), rows._replace(conditional=jnp.zeros_like(rows.conditional))

  def predict(params, x, t, cond, *args, **kwargs):
    inner, rows = cond
    res = residuals(nets, _weights(params, len(nets)), _inputs(params), rows, x[..., :channels], t, inner, pool)
    return pipe.predict(params, x, t, inner, *args, residuals=res, **kwargs)

  key = None if pipe.fingerprint is None else programs.fingerprint("controlnet", pipe.fingerprint, nets)
  return dataclasses.replace(pipe, encode_text=encode_text, predict=predict, fingerprint=key,
                             default_negative=None if pipe.default_negative is None else default_negative)


# ----------------------------------------------------------------------------------
# Boundary checks.
# ----------------------------------------------------------------------------------
def architecture(params: Mapping) -> dict:
  """block_out_channels, layers_per_block and cross_attention_dim of a U-Net's or a ControlNet's parameters (the
  encoder they share: ``down_blocks_*`` and their cross-attention)."""
  params = nn.meta.unbox(dict(params))
  blocks = sorted((k for k in params if re.fullmatch(r"down_blocks_\d+", k)), key=lambda k: int(k.split("_")[-1]))
  widths = tuple(int(params[b]["resnets_0"]["conv2"]["kernel"].shape[-1]) for b in blocks)
  layers = sum(k.startswith("resnets_") for k in params[blocks[0]]) if blocks else 0
  cross = next((int(leaf.shape[0]) for path, leaf in traverse_util.flatten_dict(params).items()
                if path[-3:] == ("attn2", "to_k", "kernel")), None)
  return {"block_out_channels": widths, "layers_per_block": layers, "cross_attention_dim": cross}


def unet_mismatch(controlnet_params: Mapping, unet_params: Mapping) -> str | None:
  """None if a ControlNet fits a U-Net, else which of its encoder's settings differ (``architecture``)."""
  mine, theirs = architecture(controlnet_params), architecture(unet_params)
  bad = [f"{k} {mine[k]} (the U-Net's {theirs[k]})" for k in mine if mine[k] != theirs[k]]
  return "; ".join(bad) or None


def unet_params(params: Mapping) -> Mapping | None:
  """The U-Net's parameters in a pipeline's: a Stable Diffusion pipeline's ``'unet'``, a diffjax workdir's
  ``'model'`` / ``'denoiser'``; None for another network."""
  if "unet" in params:
    return params["unet"]
  model = params.get("model")
  return model.get("denoiser") if isinstance(model, Mapping) else None


def _check_run(pipe: core.Pipeline, params, control: Control) -> None:
  """The ControlNets' count against the control images', and each ControlNet against the U-Net (if params has one)."""
  k = len(control.images)
  weights = params.get("controlnet")
  count = 0 if weights is None else 1 if isinstance(weights, Mapping) else len(weights)
  if count != k:
    raise ValueError(f"{k} control images for {count} ControlNets in params['controlnet']: give one per ControlNet")
  unet = unet_params(params)
  for i, w in enumerate(_weights(params, k)):
    problem = None if unet is None else unet_mismatch(w, unet)
    if problem:
      raise ValueError(f"ControlNet {i} is for another U-Net: {problem}")


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------
def _with_control(pipe: core.Pipeline, params, prompts, control: Control, plan: Plan, start: int, height: int,
                  width: int) -> dict:
  """``params`` with ``'control'``: the inputs of ``control`` for ``plan``'s grid from point ``start`` on."""
  _check_run(pipe, params, control)
  batch = len(generation._as_list(prompts, "prompts"))
  inputs = control_inputs(control, batch=batch, height=height, width=width, ts=plan.ts[start:],
                          denoise_final=plan.denoise_final, time_scale=pipe.time_scale)
  return {**params, "control": inputs}


def _recorded(out: generation.Output, control: Control) -> generation.Output:
  return dataclasses.replace(out, record=out.record | {"control": control.record()})


def generate(pipe: core.Pipeline, params, prompts, control: Control, *, plan: Plan | None = None, image=None,
             strength: float = 0.8, height: int = 512, width: int = 512, **kwargs) -> generation.Output:
  """``generate.generate`` (txt2img, or img2img with ``image``) of a ``with_controlnets`` pipeline, steered as
  ``control`` says (its images at height x width); ``params`` holds ``'controlnet'``. The record gets
  ``control`` (``Control.record``). Other arguments as ``generate.generate``'s."""
  plan = plan or generation.plan_for(pipe)
  start = generation.first_step(plan, strength) if image is not None else 0
  params = _with_control(pipe, params, prompts, control, plan, start, height, width)
  out = generation.generate(pipe, params, prompts, plan=plan, image=image, strength=strength, height=height,
                            width=width, **kwargs)
  return _recorded(out, control)


def inpaint(pipe: core.Pipeline, params, prompts, image, mask, control: Control, *, height: int, width: int,
            plan: Plan | None = None, strength: float = 1.0, **kwargs) -> generation.Output:
  """``inpaint.inpaint`` of a ``with_controlnets`` pipeline (an SD inpainting folder's, or any SD pipeline's for
  blended inpainting), steered as ``control`` says; ``params`` holds ``'controlnet'``. The record gets ``control``.
  Other arguments as ``inpaint.inpaint``'s."""
  plan = plan or generation.plan_for(pipe)
  params = _with_control(pipe, params, prompts, control, plan, generation.first_step(plan, strength), height, width)
  out = inpainting.inpaint(pipe, params, prompts, image, mask, height=height, width=width, plan=plan,
                           strength=strength, **kwargs)
  return _recorded(out, control)
