"""``train_vae(config, workdir)``: the first stage of latent diffusion, a KL autoencoder, read top to bottom.

Loss of a batch x (B, H, W, C) in [-1, 1] (Rombach et al. 2022, App. G, without the
perceptual term), x' decoded from a posterior sample z ~ q(z | x):

  L = mean |x - x'| (``vae.reconstruction = "l1"``; "l2": squared)   per pixel and channel
    + kl_weight * mean_b KL(q(z | x_b) || N(0, I))                     nats, summed over the latent
    + disc_weight * hinge generator loss + hinge discriminator loss    from step ``disc_start``,
                                                                       only with disc_weight > 0

The discriminator (a PatchGAN) and the autoencoder share one optimizer: each term's
gradient reaches only its own parameters (stop_gradient), with a fixed adversarial
weight instead of LDM's adaptive one.

Sections: mesh; data; model and state (fresh or restored); jitted step; loop (progress,
TensorBoard, checkpoints, SIGTERM); then, on the EMA weights: reconstructions of held-out
images (``reconstructions.png``: originals above reconstructions; errors and checker
attribute accuracy in ``eval.json``), the latent scaling factor 1 / std of posterior
samples of training images (as Stable Diffusion's 0.18215 was found), and the export
``workdir/vae`` (a diffusers ``AutoencoderKL`` folder whose config holds that factor),
which the second stage (``configs/shapes_ldm.py``, ``config.vae.workdir``) loads.
"""

# (no `from __future__ import annotations`: clu metric collections need evaluated annotations)

import dataclasses
import json
import os
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from clu import metrics as clu_metrics
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from diffjax import images, schema
from diffjax.convert import save_pretrained
from diffjax.data import pipeline
from diffjax.evaluate.shapes import ATTRIBUTES, attribute_accuracy
from diffjax.models import vae as vae_lib
from diffjax.train import loop, sharding, steps, trainer
from diffjax.train.checkpoint import Checkpointer
from diffjax.train.latent import VAE_FOLDER


@dataclasses.dataclass(frozen=True)
class VAELoss:
  """Loss settings (see the module docstring); ``ema_decay`` 0 keeps no average (EMA = weights)."""

  reconstruction: str = "l1"
  kl_weight: float = 1e-6
  disc_weight: float = 0.0
  disc_start: int = 0
  ema_decay: float = 0.0


@struct.dataclass
class VAEMetrics(clu_metrics.Collection):
  """Training metrics: total loss, reconstruction (per pixel), KL (nats per image), discriminator loss."""

  loss: clu_metrics.Average.from_output("loss")
  reconstruction: clu_metrics.Average.from_output("reconstruction")
  kl: clu_metrics.Average.from_output("kl")
  disc_loss: clu_metrics.Average.from_output("disc_loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")


def vae_train_step(state: steps.TrainState, batch: dict, *, vae, disc, tx, loss: VAELoss):
  """One optimizer step on {"image": (B, H, W, C)}; params {"vae"[, "disc"]}. Returns (state, VAEMetrics, loss)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  x = batch["image"]

  def loss_fn(params):
    recon, posterior = vae.apply({"params": params["vae"]}, x, key)
    rec = jnp.mean(vae_lib.reconstruction_loss(x, recon, loss.reconstruction))
    kl = jnp.mean(posterior.kl())
    total, d_loss = rec + loss.kl_weight * kl, jnp.zeros(())
    if disc is not None:  # each term trains only its own side
      on = (state.step >= loss.disc_start).astype(jnp.float32)
      logits = lambda p, img: disc.apply({"params": p}, img)
      g_loss = vae_lib.hinge_g_loss(logits(jax.lax.stop_gradient(params["disc"]), recon))
      d_loss = vae_lib.hinge_d_loss(logits(params["disc"], x), logits(params["disc"], jax.lax.stop_gradient(recon)))
      total = total + on * (loss.disc_weight * g_loss + d_loss)
    return total, (rec, kl, d_loss)

  (total, (rec, kl, d_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: loss.ema_decay * e + (1.0 - loss.ema_decay) * p, state.ema_params, params)
  metrics = VAEMetrics.single_from_model_output(loss=total, reconstruction=rec, kl=kl, disc_loss=d_loss,
                                                grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics, total


class VAEComponents(NamedTuple):
  vae: vae_lib.AutoencoderKL
  disc: vae_lib.PatchDiscriminator | None
  loss: VAELoss
  tx: optax.GradientTransformation
  init_state: object  # () -> steps.TrainState
  abstract_state: steps.TrainState


def build_components(config) -> VAEComponents:
  """Autoencoder, optional discriminator, loss settings, optimizer and state initializer from the config."""
  schema.validate(config, "train_vae")
  v = config.vae
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig(
      in_channels=config.data.channels, out_channels=config.data.channels, latent_channels=v.latent_channels,
      block_out_channels=tuple(v.channels), layers_per_block=v.layers_per_block, norm_num_groups=v.norm_groups,
      mid_block_attention=v.mid_block_attention, scaling_factor=1.0))
  disc = None
  if v.disc_weight > 0:
    disc = vae_lib.PatchDiscriminator(channels=v.disc_channels, n_layers=v.disc_layers, groups=v.norm_groups)
  loss = VAELoss(v.reconstruction, v.kl_weight, v.disc_weight, v.disc_start, config.train.ema_decay)
  tx = trainer.build_optimizer(config)
  k_init, k_disc, k_train = jax.random.split(jax.random.key(config.seed), 3)
  size = config.data.image_size

  def init_state():
    params = {"vae": flax.linen.meta.unbox(vae.init(k_init, jnp.zeros((1, size, size, config.data.channels)))
                                           ["params"])}
    if disc is not None:
      params["disc"] = flax.linen.meta.unbox(disc.init(k_disc, jnp.zeros((1, size, size, config.data.channels)))
                                             ["params"])
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                            opt_state=tx.init(params), rng=jax.random.key_data(k_train))

  return VAEComponents(vae, disc, loss, tx, init_state, jax.eval_shape(init_state))


# ----------------------------------------------------------------------------------
def train_vae(config, workdir: str) -> steps.TrainState:
  """Trains the VAE per ``config``, resuming from ``workdir``; evaluates and exports it (module docstring)."""
  # -- distributed setup and mesh -----------------------------------------------------------
  trainer.initialize_distributed(config)
  mesh = trainer.make_mesh(config)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"), just_logging=not is_main)

  # -- data ----------------------------------------------------------------------------------
  c = build_components(config)
  data_dir = trainer.dataset_dir(config, workdir)
  options = pipeline.ImageTextOptions(batch_size=config.data.batch_size // jax.process_count(),
                                      image_size=config.data.image_size, max_shift=config.data.max_shift)
  source = trainer.load_train_source(config, data_dir)
  data_iter = iter(pipeline.image_text_dataset(source, options, trainer.tokenize_fn(config.data.max_caption_length),
                                               seed=config.seed, shard_index=jax.process_index(),
                                               shard_count=jax.process_count()))

  # -- state ---------------------------------------------------------------------------------
  state_sharding = jax.tree.map(lambda _: replicated, c.abstract_state)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints)
  restored = checkpointer.restore_latest(sharding.with_shardings(c.abstract_state, state_sharding))
  if restored is None:
    state = jax.jit(c.init_state, out_shardings=state_sharding)()
  else:
    state, data_state, _ = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    logging.info("resumed the VAE from the checkpoint of step %d", int(state.step))
  if is_main:  # (replicated: every process holds all of it)
    parameter_overview.log_parameter_overview(jax.device_get(state.params))
  train_step = jax.jit(lambda s, b: vae_train_step(s, b, vae=c.vae, disc=c.disc, tx=c.tx, loss=c.loss),
                       in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None, None),
                       donate_argnums=0)

  # -- loop ------------------------------------------------------------------------------------
  def check(step, loss):
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"non-finite VAE loss {float(loss)} at step {step}: lower config.optim.learning_rate")

  num_steps = config.train.num_steps
  state, step, preempted = loop.train_loop(
      state, train_step=train_step,
      next_batch=lambda: {"image": jax.make_array_from_process_local_data(batch_sharding, next(data_iter)["image"])},
      num_steps=num_steps, checkpointer=checkpointer, data_iter=data_iter, writer=writer,
      log_every=config.train.log_every, checkpoint_every=config.train.checkpoint_every, check=check,
      hooks=[periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.train.log_every)])

  # -- evaluation and export -----------------------------------------------------------------------
  if not preempted and step >= num_steps and is_main:  # on process 0, with a host copy of the replicated weights
    scores = evaluate_and_export(c.vae, jax.device_get(state.ema_params["vae"]), config, data_dir, workdir, source)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items() if np.isscalar(v)})
  writer.flush()
  return state


def evaluate_and_export(vae, params, config, data_dir: str, workdir: str, train_source) -> dict:
  """Reconstruction errors on ``config.data.eval_split``, the scaling factor, the PNG grid and the export.

  Returns (and writes to eval.json) {"l1", "mse", "psnr_db" (peak-to-peak 2 in [-1, 1]),
  "recon_attribute_accuracy" (checker on reconstructions vs the captions' attributes, all
  right; for shapes data, with "recon_<attribute>_accuracy" per attribute), "latent_mean",
  "latent_std", "scaling_factor", "num_images"}.
  """
  e = config.eval
  reconstruct = jax.jit(lambda x: vae.apply({"params": params}, x)[0])
  source = pipeline.load_source(config.data.name, config.data.eval_split, data_dir)
  n = min(e.num_images, len(source))
  examples = [source[i] for i in range(n)]
  x = np.stack([np.asarray(ex["image"]) for ex in examples]).astype(np.float32) / 127.5 - 1.0
  recon = np.concatenate([np.asarray(reconstruct(x[i:i + 256])) for i in range(0, n, 256)])
  recon = np.clip(recon, -1.0, 1.0)
  mse = float(np.mean((recon - x) ** 2))
  scores = {"l1": float(np.mean(np.abs(recon - x))), "mse": mse, "psnr_db": float(10 * np.log10(4.0 / mse)),
            "num_images": n}
  if all(a in examples[0] for a in ATTRIBUTES):
    recon_right = attribute_accuracy(recon, {a: [ex[a] for ex in examples] for a in ATTRIBUTES})
    scores["recon_attribute_accuracy"] = recon_right.pop("all")
    scores |= {f"recon_{a}_accuracy": v for a, v in recon_right.items()}
  k = min(e.grid_images, n)
  grid = images.grid(images.to_uint8(np.concatenate([x[:k], recon[:k]])), rows=2)
  images.save_png(grid, os.path.join(workdir, "reconstructions.png"), scale=max(1, 512 // grid.shape[1]))

  # Scaling factor: 1 / std of posterior samples of training images (Rombach et al. 2022, Sec. 3.3 / App. G).
  encode = jax.jit(lambda x, key: vae.apply({"params": params}, x, method="encode").sample(key))
  m = min(e.scale_images, len(train_source))
  train_x = np.stack([np.asarray(train_source[i]["image"]) for i in range(m)]).astype(np.float32) / 127.5 - 1.0
  z = np.concatenate([np.asarray(encode(train_x[i:i + 256], jax.random.key(i))) for i in range(0, m, 256)])
  scores.update(latent_mean=float(z.mean()), latent_std=float(z.std()), scaling_factor=float(1.0 / z.std()),
                latent_shape=list(z.shape[1:]))
  exported = vae_lib.AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scores["scaling_factor"]))
  save_pretrained(exported, params, os.path.join(workdir, VAE_FOLDER))
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(scores, f, indent=2)
  logging.info("VAE evaluation on %s: %s; exported to %s", config.data.eval_split, scores,
               os.path.join(workdir, VAE_FOLDER))
  return scores
