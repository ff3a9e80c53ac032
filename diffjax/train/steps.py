"""Pure, module-level step functions of text-to-image diffusion training (sampling: ``diffjax.pipelines``)."""

# (no `from __future__ import annotations`: clu metric collections need evaluated annotations)

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from flax import struct

from diffjax import losses
from diffjax.processes import Process
from diffjax.train import repa as repa_lib

NUM_SIGMA_BINS = 4  # the loss is also reported per log-SNR quartile of the process range


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; checkpointed as one pytree."""

  step: jax.Array  # int32 scalar
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data of the root training key


def _loss_in_sigma_bin(k: int):
  """Average of the per-example loss over the examples whose noise level falls in bin k."""
  return clu_metrics.Average.from_fun(lambda per_example_loss, sigma_bin, **_: {
      "values": per_example_loss, "mask": sigma_bin == k})


@struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Training metrics; ``loss_sigma_bin{k}``: loss per log-SNR quartile (0 = least noise)."""

  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  loss_sigma_bin0: _loss_in_sigma_bin(0)
  loss_sigma_bin1: _loss_in_sigma_bin(1)
  loss_sigma_bin2: _loss_in_sigma_bin(2)
  loss_sigma_bin3: _loss_in_sigma_bin(3)


# ``TrainMetrics`` of a step with representation alignment (``loss`` stays the denoising loss alone);
# ``repa_alignment``: the negative cosine similarity of projected tokens and targets (-1 best). (clu collects the
# metrics a class annotates itself, not those of its bases: hence a new collection rather than a subclass.)
RepaTrainMetrics = clu_metrics.Collection.create(**TrainMetrics.__annotations__,
                                                 repa_alignment=clu_metrics.Average.from_output("repa_alignment"))


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
  """How the network is trained as a denoiser (typed view of the config's diffusion section).

  Attributes:
    process: the noise process.
    target: what the network predicts (``parameterization.TARGETS``).
    weighting: loss weighting (``losses.WEIGHTINGS``); weighting_options: gamma, sigma_data.
    time_sampler: ``losses.TIME_SAMPLERS`` key; time_sampler_options: its parameters.
    time_scale: the network receives time_scale * t (e.g. 1000 for t in [0, 1]).
    cond_dropout: probability of replacing the caption by the empty one (for CFG).
    ema_decay: decay of the parameter EMA.
  """

  process: Process
  target: str = "eps"
  weighting: str = "uniform"
  weighting_options: tuple = ()
  time_sampler: str = "uniform"
  time_sampler_options: tuple = ()
  time_scale: float = 1.0
  cond_dropout: float = 0.1
  ema_decay: float = 0.999


def _sigma_bins(process: Process, t):
  """Index 0..NUM_SIGMA_BINS-1 of t's log-SNR within the process's range (0 = least noise)."""
  lo, hi = process.log_snr(process.t_max), process.log_snr(process.t_min)
  frac = (hi - process.log_snr(t)) / (hi - lo)
  return jnp.clip((frac * NUM_SIGMA_BINS).astype(jnp.int32), 0, NUM_SIGMA_BINS - 1)


def with_frozen(params: dict, frozen) -> dict:
  """The model's full parameters: the trained ones and ``frozen["model"]`` (e.g. a frozen text encoder's)."""
  return params if frozen is None else {**params, **frozen.get("model", {})}


def train_step(state: TrainState, batch: dict, null_tokens: jax.Array, null_mask: jax.Array, *, model, tx,
               spec: DiffusionSpec, frozen=None, encode=None, compose=with_frozen, repa=None):
  """One optimizer step on a batch {"image" (B,H,W,C), "tokens" (B,L), "mask" (B,L)[, "weight" (B,)][, "control"]}.

  The loss is the mean of the per-example losses, or with "weight" their weighted sum (e.g.
  DreamBooth's instance and prior examples: 1 / B_instance and lambda / B_prior). A "control"
  entry (a ControlNet's control images) is passed to the model as ``control=``.

  Args:
    frozen: parameters that are used but not trained (None: none). ``frozen["model"]``, if
      present, is merged into the model's parameters (e.g. {"text_encoder": ...} of a
      frozen pretrained text encoder); ``encode`` receives all of ``frozen``.
    encode: ``encode(frozen, batch, key) -> x0`` (B, h, w, c), the data the network
      learns to denoise, e.g. latents of a frozen VAE; None: ``batch["image"]``.
    compose: ``compose(trained params, frozen) -> the model's parameters`` (default
      ``with_frozen``; LoRA: the frozen base with the trained adapters merged in).
    repa: a ``repa.RepaSpec``: the objective adds ``repa.weight`` times the alignment of the
      denoiser's image tokens (projected by ``params["repa_projector"]``) with the features that
      ``encode(frozen, batch, key, features=True)`` returns beside x0 (``RepaTrainMetrics``);
      None: the denoising loss alone.

  Returns (new state, ``TrainMetrics`` of this step, diagnostics: loss, per-example
  losses, gradient norm and batch image statistics, for the non-finite-loss error).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  k_t, k_eps, k_drop, k_dropout = jax.random.split(key, 4)
  k_x0 = jax.random.fold_in(key, 1)
  if repa is None:
    x0, targets = (batch["image"] if encode is None else encode(frozen, batch, k_x0)), None
  else:  # one pass of the frozen encoder gives the latents and REPA's features
    x0, features = encode(frozen, batch, k_x0, features=True)
    targets = repa.targets(features)
  b = x0.shape[0]
  t = losses.TIME_SAMPLERS[spec.time_sampler](k_t, (b,), spec.process, **dict(spec.time_sampler_options))
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  drop = jax.random.bernoulli(k_drop, spec.cond_dropout, (b, 1))
  tokens = jnp.where(drop, null_tokens[None], batch["tokens"])
  mask = jnp.where(drop, null_mask[None], batch["mask"])
  control = {"control": batch["control"]} if "control" in batch else {}  # (kept when the caption is dropped)

  def loss_fn(params):
    sown = {}

    def predict(x_t, tt):
      args = ({"params": compose(params, frozen)}, x_t, spec.time_scale * tt, tokens, mask)
      kw = dict(deterministic=False, rngs={"dropout": k_dropout}, **control)
      if repa is None:
        return model.apply(*args, **kw)
      out, state = model.apply(*args, mutable=["intermediates"], **kw)
      sown["tokens"] = repa_lib.image_tokens(state["intermediates"], repa.layer)
      return out

    per_example = losses.denoising_loss(predict, x0, eps, t, spec.process, target=spec.target,
                                        weighting=spec.weighting, **dict(spec.weighting_options))
    loss = jnp.mean(per_example) if "weight" not in batch else jnp.sum(batch["weight"] * per_example)
    if repa is None:
      return loss, (loss, per_example, ())
    aligned = jnp.mean(repa_lib.alignment(repa.projector.apply({"params": params[repa_lib.PARAMS]}, sown["tokens"]),
                                          targets))
    return loss + repa.weight * aligned, (loss, per_example, aligned)

  (_, (loss, per_example, aligned)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: spec.ema_decay * e + (1.0 - spec.ema_decay) * p, state.ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  grad_norm = optax.tree.norm(grads)
  metrics = (TrainMetrics if repa is None else RepaTrainMetrics).single_from_model_output(
      loss=loss, grad_norm=grad_norm, per_example_loss=per_example, sigma_bin=_sigma_bins(spec.process, t),
      repa_alignment=aligned)
  diagnostics = {"loss": loss, "per_example_loss": per_example, "grad_norm": grad_norm,
                 "image_mean": jnp.mean(x0), "image_std": jnp.std(x0)}
  return new_state, metrics, diagnostics
