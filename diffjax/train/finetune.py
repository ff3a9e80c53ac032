"""``finetune(config, workdir)``: a trained diffjax model adapted to a few images (``configs/finetune.py``).

LoRA (Hu et al. 2022) or full fine-tuning, optionally with DreamBooth's prior preservation
(Ruiz et al. 2023): the loss on a batch of instance images plus ``prior.weight`` times the loss
on a batch of images the base model drew itself for captions of what it already knows. Read
top to bottom: the base, the instance and prior images, the trainable parameters, the loop
(``loop.train_loop``: progress, checkpoints, SIGTERM; a rerun resumes), the LoRA file, the
evaluation. One device (the base's mesh settings are not used).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image

from diffjax import images
from diffjax.adapters import lora, lora_files
from diffjax.data import pipeline
from diffjax.schema import ConfigError
from diffjax.train import loop, steps, trainer
from diffjax.train.checkpoint import Checkpointer

LORA_FILE = "lora.safetensors"  # the trained adapters of the U-Net (model 'unet'), diffusers format
PRIOR_FILE = "prior.npz"  # the base model's prior-preservation images, drawn once
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------------
# The base model.
# ----------------------------------------------------------------------------------
def base_config(config) -> ml_collections.ConfigDict:
  """The base workdir's training config, with the VAE where ``config.vae_workdir`` says and latents encoded per step."""
  path = os.path.join(config.base, trainer.CONFIG_FILE)
  if not config.base or not os.path.isfile(path) or not os.path.isdir(os.path.join(config.base, "checkpoints")):
    raise ConfigError(f"config.base = {config.base!r} is not a diffjax training workdir ({trainer.CONFIG_FILE} and "
                      f"checkpoints/)")
  with open(path) as f:
    base = ml_collections.ConfigDict(json.load(f))
  if base.get("job") != "train":
    raise ConfigError(f"config.base = {config.base!r} was trained by job {base.get('job')!r}, not 'train'")
  if base.get("vae"):
    if config.vae_workdir:
      base.vae.workdir = config.vae_workdir
    base.data.cache_latents = False  # the few images are encoded in the step
  return base


# ----------------------------------------------------------------------------------
# Instance and prior images: lists of {"image": uint8 (H, W, C), "caption": str}, a grain source each.
# ----------------------------------------------------------------------------------
def _folder_records(folder: str, prompt: str, size: int, channels: int) -> list[dict]:
  files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise ConfigError(f"config.instance.folder = {folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
  if not prompt:
    raise ConfigError("config.instance.prompt is empty: images of instance.folder need a caption")
  out = []
  for f in files:
    try:
      with Image.open(f) as im:
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
        image = np.asarray(im).reshape(size, size, channels)
    except OSError as e:
      raise ConfigError(f"config.instance.folder: {f} is not a readable image ({e})") from None
    out.append({"image": image, "caption": prompt})
  return out


def instance_records(config, base, data_dir: str) -> list[dict]:
  """The instance images: ``instance.folder``'s files captioned ``instance.prompt``, or the first
  ``instance.num_images`` examples of the base data's ``instance.split`` whose caption contains
  ``instance.caption_contains`` (captioned ``instance.prompt`` when it is set)."""
  inst = config.instance
  if inst.folder:
    return _folder_records(inst.folder, inst.prompt, base.data.image_size, base.data.channels)[:inst.num_images]
  source = pipeline.load_source(base.data.name, inst.split, data_dir)
  out = []
  for i in range(len(source)):
    e = source[i]
    caption = pipeline.caption_text(e["caption"])
    if inst.caption_contains in caption:
      labels = {} if inst.prompt else {k: e[k] for k in e if k not in ("image", "caption")}  # (what it shows)
      out.append({"image": np.asarray(e["image"]), "caption": inst.prompt or caption} | labels)
      if len(out) == inst.num_images:
        break
  if not out:
    raise ConfigError(f"config.instance.caption_contains = {inst.caption_contains!r} matches no caption of "
                      f"{base.data.name}:{inst.split}")
  return out


def prior_prompts(config, base, data_dir: str, exclude: set[str]) -> list[str]:
  """``prior.prompts``, or the distinct captions of the base data's ``prior.split`` (not instance captions)."""
  if config.prior.prompts:
    return list(config.prior.prompts)
  source = pipeline.load_source(base.data.name, config.prior.split, data_dir)
  out: dict[str, None] = {}
  for i in range(len(source)):
    caption = pipeline.caption_text(source[i]["caption"])
    if caption not in exclude:
      out.setdefault(caption)
    if len(out) == config.prior.num_images:
      break
  return list(out)


def prior_records(config, base, c: trainer.Components, sample_fn, params, plan, data_dir: str, workdir: str,
                  exclude: set[str]) -> list[dict]:
  """``prior.num_images`` images the base model draws (cycling through ``prior_prompts``), drawn once and kept
  in ``workdir/prior.npz`` so that a resumed run trains on the same ones."""
  path = os.path.join(workdir, PRIOR_FILE)
  if os.path.isfile(path):
    with np.load(path) as f:
      drawn, prompts = f["images"], [str(p) for p in f["prompts"]]
  else:
    pool = prior_prompts(config, base, data_dir, exclude)
    n = config.prior.num_images
    prompts = [pool[i % len(pool)] for i in range(n)]
    key = jax.random.fold_in(jax.random.key(config.seed), 3)
    logging.info("drawing %d prior-preservation images with the base model (%d prompts)", n, len(pool))
    drawn = trainer.generate(sample_fn, params, prompts, plan, base.sampler.guidance_scale, c.tokenize, 1, key)
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=drawn, prompts=np.asarray(prompts))
    os.replace(tmp, path)
  return [{"image": image, "caption": p} for image, p in zip(drawn, prompts, strict=True)]


class _Batches:
  """Instance batches (and prior batches) side by side, one checkpointable iterator state for both."""

  def __init__(self, instance, prior=None):
    self.iters = {"instance": instance} | ({"prior": prior} if prior is not None else {})

  def __next__(self) -> dict:
    return {name: next(it) for name, it in self.iters.items()}

  def get_state(self) -> dict:
    return {name: it.get_state() for name, it in self.iters.items()}

  def set_state(self, state: dict) -> None:
    for name, it in self.iters.items():
      it.set_state(state[name])


def _dataset(records, batch_size: int, image_size: int, tokenize, seed: int):
  options = pipeline.ImageTextOptions(batch_size=min(batch_size, len(records)), image_size=image_size)
  return iter(pipeline.image_text_dataset(records, options, tokenize, seed=seed, prefetch_threads=1))


def merged_batch(batches: dict, prior_weight: float) -> dict:
  """One training batch from {"instance": batch[, "prior": batch]}: the examples concatenated, with per-example
  weights 1 / B_instance and ``prior_weight`` / B_prior (``steps.train_step``'s weighted loss)."""
  parts = [(batches["instance"], 1.0)] + ([(batches["prior"], prior_weight)] if "prior" in batches else [])
  out = {"image": np.concatenate([b["image"] for b, _ in parts]),
         "tokens": np.concatenate([b["tokens"][:, 0] for b, _ in parts]),
         "mask": np.concatenate([b["tokens"][:, 1] for b, _ in parts]),
         "weight": np.concatenate([np.full(len(b["image"]), w / len(b["image"]), np.float32) for b, w in parts])}
  return jax.tree.map(jnp.asarray, out)


# ----------------------------------------------------------------------------------
# Trainable parameters.
# ----------------------------------------------------------------------------------
def trainable(config, params: dict) -> tuple[dict, callable]:
  """(what is trained, ``compose(trained, frozen) -> model params``) for ``config.method`` from the base's
  trained params: the adapters over a frozen base (``frozen["base"]``), or the params themselves."""
  if config.method == "full":
    return params, steps.with_frozen
  if config.method != "lora":
    raise ConfigError(f"config.method = {config.method!r} is invalid: expected 'lora' or 'full'")
  try:
    adapters = lora.init_lora(params, lora.LoraConfig(config.lora.rank, config.lora.alpha, tuple(config.lora.targets)),
                              jax.random.fold_in(jax.random.key(config.seed), 4))
  except ValueError as e:
    raise ConfigError(f"config.lora.targets: {e}") from None
  return adapters, lambda a, frozen: steps.with_frozen(lora.merge(frozen["base"], a), frozen)


def write_unet_lora(path: str, adapters: lora.Adapters) -> None:
  """The adapters of the U-Net ('denoiser/...') as a diffusers-format LoRA file of model 'unet'."""
  unet = {p.removeprefix("denoiser/"): a for p, a in adapters.items() if p.startswith("denoiser/")}
  if len(unet) != len(adapters):
    logging.warning("%d adapters outside the U-Net are kept in the checkpoint only", len(adapters) - len(unet))
  if unet:
    lora_files.write_lora(path, {"unet": unet})


# ----------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------
def finetune(config, workdir: str):
  """Fine-tunes ``config.base`` per ``config``, checkpointing to and resuming from ``workdir``; returns the state."""
  os.makedirs(workdir, exist_ok=True)
  base = base_config(config)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  c, (base_params, frozen), base_step = trainer.load_components(base, config.base)
  logging.info("base: %s at step %d", config.base, base_step)
  plan = trainer.sample_plan(base, c.spec.process)
  sample_fn = trainer.make_sample_fn(c, plan)
  data_dir = trainer.dataset_dir(base, config.base)
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"))

  # -- images --------------------------------------------------------------------------
  instances = instance_records(config, base, data_dir)
  captions = {r["caption"] for r in instances}
  logging.info("%d instance images (%s)", len(instances), ", ".join(sorted(captions)[:3]))
  prior = None
  if config.prior.weight > 0:
    prior = prior_records(config, base, c, sample_fn, (base_params, frozen), plan, data_dir, workdir, captions)
  size = base.data.image_size
  batches = _Batches(_dataset(instances, config.instance.batch_size, size, c.tokenize, config.seed),
                     prior and _dataset(prior, config.prior.batch_size, size, c.tokenize, config.seed + 1))

  # -- what trains ------------------------------------------------------------------------
  trained, compose = trainable(config, base_params)
  # (the base's own frozen parts, None for a pixel model, are what sampling takes; training also gets the base)
  train_frozen = (dict(frozen or {}) | {"base": base_params}) if config.method == "lora" else frozen
  spec = dataclasses.replace(c.spec, cond_dropout=config.train.cond_dropout, ema_decay=config.train.ema_decay)
  tx = trainer.build_optimizer(config)
  fresh = lambda tree: jax.tree.map(jnp.copy, tree)  # own buffers: the step donates the state, not the base
  init = lambda: steps.TrainState(step=jnp.zeros((), jnp.int32), params=fresh(trained), ema_params=fresh(trained),
                                  opt_state=tx.init(trained),
                                  rng=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 5)))
  n_trained, n_base = lora.num_params(trained), lora.num_params(base_params)
  logging.info("training %s: %d of the base's %d parameters (%.2f%%)", config.method, n_trained, n_base,
               100 * n_trained / n_base)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints)
  restored = checkpointer.restore_latest(jax.eval_shape(init))
  if restored is None:
    state = init()
  else:
    state, data_state, step = restored
    if data_state is not None:
      batches.set_state(data_state)
    logging.info("resumed from the checkpoint of step %d", step)
  encode = None if c.latent is None else c.latent.encode
  train_step = jax.jit(lambda s, b, f: steps.train_step(s, b, c.null_tokens, c.null_mask, model=c.model, tx=tx,
                                                        spec=spec, frozen=f, encode=encode, compose=compose),
                       donate_argnums=0)

  def check(step, diag):
    if not np.isfinite(float(diag["loss"])):
      raise FloatingPointError(f"non-finite loss {float(diag['loss'])} at step {step}")

  state, step, preempted = loop.train_loop(
      state, train_step=lambda s, b: train_step(s, b, train_frozen),
      next_batch=lambda: merged_batch(next(batches), config.prior.weight), num_steps=config.train.num_steps,
      checkpointer=checkpointer, data_iter=batches, writer=writer, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every, check=check)
  if preempted or step < config.train.num_steps:
    return state

  # -- outputs ----------------------------------------------------------------------------
  tuned = compose(state.ema_params, train_frozen)
  if config.method == "lora":
    write_unet_lora(os.path.join(workdir, LORA_FILE), state.ema_params)
  scores = evaluate(config, base, c, sample_fn, (tuned, frozen), (base_params, frozen), plan, instances, prior,
                    workdir)
  scores |= {"trained_parameters": n_trained, "base_parameters": n_base, "method": config.method}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(scores, f, indent=2)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in _flat_scalars(scores).items()})
  writer.flush()
  return state


def _flat_scalars(scores: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in scores.items():
    if isinstance(v, dict):
      out |= _flat_scalars(v, f"{prefix}{k}_")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[prefix + k] = v
  return out


def evaluate(config, base, c, sample_fn, tuned, before, plan, instances, prior, workdir: str) -> dict:
  """Samples of the tuned model (and of the base, for comparison) for up to ``eval.prompts`` instance captions
  and as many prior captions, ``eval.samples_per_prompt`` each: ``finetune.png`` (rows: prompts; tuned, then
  base) and, for a shapes base, per-attribute accuracy (``evaluate.shapes.attribute_accuracy``)."""
  from diffjax.evaluate.shapes import ATTRIBUTES, attribute_accuracy

  n = config.eval.samples_per_prompt
  groups = {"instance": _distinct(instances, config.eval.prompts)}
  if prior:
    groups["prior"] = _distinct(prior, config.eval.prompts)
  key = jax.random.fold_in(jax.random.key(config.seed), 6)
  scores, rows, labels = {}, [], []
  for name, examples in groups.items():
    prompts = list(examples)
    for which, params in (("tuned", tuned), ("base", before)):
      samples = trainer.generate(sample_fn, params, prompts, plan, base.sampler.guidance_scale, c.tokenize, n, key)
      rows.append(samples)
      labels += [f"{which}: {p}" for p in prompts]
      asked = [_asked(examples[p], p) for p in prompts] if base.data.name == "shapes_captions" else [None]
      if all(q is not None for q in asked):
        wanted = {a: np.repeat([q[a] for q in asked], n) for a in ATTRIBUTES}
        scores.setdefault(name, {})[which] = attribute_accuracy(samples, wanted)
  images.save_labeled_grid(np.concatenate(rows), labels, os.path.join(workdir, "finetune.png"))
  logging.info("fine-tuning evaluation: %s", scores)
  return scores


def _distinct(records: list[dict], limit: int) -> dict[str, dict]:
  """{caption: its first record} for the first ``limit`` distinct captions."""
  out: dict[str, dict] = {}
  for r in records:
    out.setdefault(r["caption"], r)
    if len(out) == limit:
      break
  return out


def _asked(record: dict, caption: str) -> dict | None:
  """What a shapes example asks for: its labels, else its caption's words; None when neither says."""
  from diffjax.data import shapes
  from diffjax.evaluate.shapes import ATTRIBUTES

  if all(a in record for a in ATTRIBUTES):
    return {a: record[a] for a in ATTRIBUTES}
  try:
    return shapes.parse_caption(caption)
  except ValueError:
    return None
