"""``finetune(config, workdir)``: a trained diffjax model adapted to a few images (``configs/finetune.py``).

Methods (``Tuning``: what trains, and how the network is put together from it and the frozen
base): LoRA (Hu et al. 2022), full fine-tuning, textual inversion (Gal et al. 2023: the rows of
a new token) and ControlNet (Zhang et al. 2023: a trainable copy of the U-Net's encoder adding
zero-initialised residuals). Any of them with DreamBooth's prior preservation (Ruiz et al.
2023): the loss on a batch of instance images plus ``prior.weight`` times the loss on a batch
of images the base model drew itself for captions of what it already knows. Read top to
bottom: the base, the instance and prior images, the trainable parameters, the loop
(``loop.train_loop``: progress, checkpoints, SIGTERM; a rerun resumes), the exchangeable file,
the evaluation. One device (the base's mesh settings are not used).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image

from diffjax import images, pipelines
from diffjax.adapters import lora, lora_files, textual_inversion
from diffjax.convert.controlnet import save_controlnet
from diffjax.data import pipeline, shapes
from diffjax.models.controlnet import ControlNetConfig
from diffjax.models.controlnet import from_unet as controlnet_from_unet
from diffjax.models.text_to_image import ControlledTextToImage, controlnet_of
from diffjax.schema import ConfigError
from diffjax.train import loop, steps, trainer
from diffjax.train.checkpoint import Checkpointer

LORA_FILE = "lora.safetensors"  # the trained adapters of the U-Net (model 'unet'), diffusers format
EMBEDDING_FILE = "learned_embeds.safetensors"  # textual inversion's token rows, diffusers format
CONTROLNET_FOLDER = "controlnet"  # the trained ControlNet, a diffusers ControlNetModel folder
PRIOR_FILE = "prior.npz"  # the base model's prior-preservation images, drawn once
METADATA_FILE = "metadata.jsonl"  # an instance folder's captions, one JSON object per line
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
def _folder_captions(folder: str, files: list[str], prompt: str) -> list[str]:
  """Each file's caption: its line of ``folder/metadata.jsonl`` ({"file_name", "text"}), else ``prompt``."""
  meta = os.path.join(folder, METADATA_FILE)
  table = {}
  if os.path.isfile(meta):
    with open(meta) as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            entry = json.loads(line)
            table[entry["file_name"]] = str(entry["text"])
          except (ValueError, KeyError, TypeError):
            raise ConfigError(f"config.instance.folder: {meta} line {n} is not a JSON object with file_name and "
                              f"text") from None
  missing = [os.path.basename(f) for f in files if os.path.basename(f) not in table]
  if missing and not prompt:
    raise ConfigError(f"config.instance.prompt is empty and {len(missing)} images of {folder} have no caption in "
                      f"{METADATA_FILE} (e.g. {missing[0]})")
  return [table.get(os.path.basename(f), prompt) for f in files]


def _folder_records(folder: str, prompt: str, size: int, channels: int) -> list[dict]:
  files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise ConfigError(f"config.instance.folder = {folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
  out = []
  for f, caption in zip(files, _folder_captions(folder, files, prompt), strict=True):
    try:
      with Image.open(f) as im:
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
        image = np.asarray(im).reshape(size, size, channels)
    except OSError as e:
      raise ConfigError(f"config.instance.folder: {f} is not a readable image ({e})") from None
    out.append({"image": image, "caption": caption})
  return out


def instance_records(config, base, data_dir: str) -> list[dict]:
  """The instance images: ``instance.folder``'s files (captioned by its ``metadata.jsonl``, else
  ``instance.prompt``), or the first ``instance.num_images`` examples of the base data's ``instance.split``
  whose caption contains ``instance.caption_contains`` (captioned ``instance.prompt`` when it is set)."""
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
  pool = prior_prompts(config, base, data_dir, exclude)
  if not pool:
    raise ConfigError(f"config.prior.split = {config.prior.split!r} has no captions besides the instance ones: set "
                      f"config.prior.prompts")
  prompts = [pool[i % len(pool)] for i in range(config.prior.num_images)]
  path = os.path.join(workdir, PRIOR_FILE)
  if os.path.isfile(path):
    with np.load(path) as f:
      drawn, stored = f["images"], [str(p) for p in f["prompts"]]
    if stored != prompts:
      raise ConfigError(f"{path} holds prior images for other prompts than config.prior now asks for ({len(stored)} "
                        f"vs {len(prompts)}, first {stored[:1]} vs {prompts[:1]}): use a new workdir")
  else:
    n = config.prior.num_images
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
    if set(state) != set(self.iters):
      raise ConfigError(f"the checkpoint's data positions are for {sorted(state)}, this run reads "
                        f"{sorted(self.iters)}: config.prior.weight turned prior preservation on or off since; use a "
                        f"new workdir")
    for name, it in self.iters.items():
      it.set_state(state[name])


def _dataset(records, batch_size: int, image_size: int, tokenize, seed: int):
  options = pipeline.ImageTextOptions(batch_size=min(batch_size, len(records)), image_size=image_size)
  return iter(pipeline.image_text_dataset(records, options, tokenize, seed=seed, prefetch_threads=1))


def merged_batch(batches: dict, prior_weight: float, control: str | None = None) -> dict:
  """One training batch from {"instance": batch[, "prior": batch]}: the examples concatenated, with per-example
  weights 1 / B_instance and ``prior_weight`` / B_prior (``steps.train_step``'s weighted loss), and with
  ``control`` ("mask" or "edges") the images' control maps (``data.shapes.control_map``)."""
  parts = [(batches["instance"], 1.0)] + ([(batches["prior"], prior_weight)] if "prior" in batches else [])
  out = {"image": np.concatenate([b["image"] for b, _ in parts]),
         "tokens": np.concatenate([b["tokens"][:, 0] for b, _ in parts]),
         "mask": np.concatenate([b["tokens"][:, 1] for b, _ in parts]),
         "weight": np.concatenate([np.full(len(b["image"]), w / len(b["image"]), np.float32) for b, w in parts])}
  if control is not None:
    out["control"] = shapes.control_map(out["image"], control)
  return jax.tree.map(jnp.asarray, out)


# ----------------------------------------------------------------------------------
# Trainable parameters.
# ----------------------------------------------------------------------------------
class Tuning(NamedTuple):
  """What a method trains and how the model is put together again.

  Attributes:
    trained: the initial trained tree (LoRA adapters, the params themselves, the new token rows (n, D),
      or ControlNet params).
    compose: ``compose(trained, frozen) -> the model's full parameters`` (text encoder included), with
      ``frozen`` the base's frozen parts (None for a pixel model) and, for every method but "full",
      ``frozen["base"]``: the base's trained params.
    components: the base's components, or with textual inversion's tokenizer and larger token table.
  """

  trained: object
  compose: Callable
  components: trainer.Components


def _base_with(extra: Callable) -> Callable:
  """compose = ``extra(trained, the frozen base's full params)``."""
  return lambda trained, frozen: extra(trained, steps.with_frozen(frozen["base"], frozen))


def tuning(config, c: trainer.Components, params: dict, frozen) -> Tuning:
  """The ``Tuning`` of ``config.method`` for the base's trained ``params`` and frozen parts ``frozen``."""
  key = jax.random.fold_in(jax.random.key(config.seed), 4)
  if config.method == "full":
    return Tuning(params, lambda p, fz: steps.with_frozen(p, fz), c)
  if config.method == "lora":
    try:
      adapters = lora.init_lora(params, lora.LoraConfig(config.lora.rank, config.lora.alpha,
                                                        tuple(config.lora.targets)), key)
    except ValueError as e:
      raise ConfigError(f"config.lora.targets: {e}") from None
    return Tuning(adapters, _base_with(lambda a, full: lora.merge(full, a)), c)
  if config.method == "textual_inversion":
    return _textual_inversion(config.textual_inversion, c, steps.with_frozen(params, frozen)["text_encoder"])
  if config.method == "controlnet":
    return _controlnet(config.controlnet, c, params["denoiser"], key)
  raise ConfigError(f"config.method = {config.method!r} is invalid: expected lora, full, textual_inversion or "
                    f"controlnet")


def _controlnet(cn, c: trainer.Components, unet_params: dict, key) -> Tuning:
  """A ControlNet initialised from the base's U-Net (``ControlNet.from_unet``), the base frozen; its
  conditioning embedding takes control images at the data's pixel size down to the latent size."""
  if c.model.is_transformer:
    raise ConfigError("config.method = 'controlnet' copies the base's U-Net encoder; this base's backbone is an "
                      "MMDiT (model.backbone = 'mmdit')")
  factor = c.latent.vae.config.downsample_factor if c.latent is not None else 1
  channels = tuple(cn.embedding_channels)
  if 2 ** (len(channels) - 1) != factor:
    raise ConfigError(f"config.controlnet.embedding_channels = {channels} downsample control images "
                      f"{2 ** (len(channels) - 1)}x; this base's images are {factor}x its latents: give "
                      f"{int(np.log2(factor)) + 1} entries")
  config = ControlNetConfig.from_unet(c.model.backbone, conditioning_embedding_out_channels=channels)
  model = ControlledTextToImage(c.model, config, scale=cn.scale)
  compose = _base_with(lambda p, full: {"base": full, "controlnet": p})
  # training runs the controlled network; sampling steers the base's pipeline (``evaluate_control``), none here
  return Tuning(controlnet_from_unet(unet_params, config, key=key), compose, c._replace(model=model, pipe=None))


def _textual_inversion(ti, c: trainer.Components, text_params: dict) -> Tuning:
  """New token rows initialised from ``ti.initializer``'s (the mean of its tokens' rows), everything else frozen."""
  if not hasattr(c.tokenizer, "with_added_tokens"):
    raise ConfigError(f"config.method = 'textual_inversion' needs a tokenizer that takes added tokens (CLIP or "
                      f"bytes); the base's is a {type(c.tokenizer).__name__}")
  if not ti.initializer:
    raise ConfigError("config.textual_inversion.initializer is empty: a word to start the new token from")
  try:
    rows = textual_inversion.initial_vectors(c.tokenizer, text_params, ti.initializer, ti.num_vectors,
                                             several_tokens=True)
    (tokenizer,), (extended,) = textual_inversion.add_embedding(
        textual_inversion.Embedding(ti.token, (rows,), "config.textual_inversion.token"), [c.tokenizer],
        [text_params])
  except ValueError as e:
    raise ConfigError(f"config.textual_inversion: {e}") from None
  # every vector must be reachable from a prompt (a CLIP tokenizer lowercases, and expansion looks for the
  # token as tokenized: '<Toy>' would reach its first vector alone)
  reached = set(tokenizer.encode(textual_inversion.expand_prompt(tokenizer, ti.token)))
  if not all(tokenizer.added[t] in reached for t in textual_inversion.vector_tokens(ti.token, ti.num_vectors)):
    raise ConfigError(f"config.textual_inversion.token = {ti.token!r}: a prompt reaches only some of its "
                      f"{ti.num_vectors} vectors with this tokenizer; use a lowercase token")
  model = c.model.clone(text=textual_inversion.fit_config(c.model.text, extended))
  tokenize = trainer.tokenize_fn(tokenizer.max_length, tokenizer)
  components = trainer.with_network(c, model, tokenizer)._replace(
      tokenize=lambda text: tokenize(textual_inversion.expand_prompt(tokenizer, text)))
  extend = lambda r, full: {**full, "text_encoder": textual_inversion.extend_embeddings(full["text_encoder"], r)}
  return Tuning(jnp.asarray(rows), _base_with(extend), components)


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

  # -- what trains ------------------------------------------------------------------------
  tune = tuning(config, c, base_params, frozen)
  tc = tune.components  # the base's, or with textual inversion's tokens
  # training sees the base's frozen parts and, where the method keeps them frozen, its trained params ("base")
  train_frozen = frozen if config.method == "full" else dict(frozen or {}) | {"base": base_params}
  n_trained, n_base = lora.num_params(tune.trained), lora.num_params(base_params)
  logging.info("training %s: %d parameters, the base has %d (%.2f%%)", config.method, n_trained, n_base,
               100 * n_trained / n_base)

  # -- images --------------------------------------------------------------------------
  instances = instance_records(config, base, data_dir)
  captions = {r["caption"] for r in instances}
  if config.method == "textual_inversion" and not any(config.textual_inversion.token in cap for cap in captions):
    raise ConfigError(f"config.textual_inversion.token = {config.textual_inversion.token!r} appears in no instance "
                      f"caption: nothing would train (caption the images with it: instance.folder's "
                      f"metadata.jsonl or instance.prompt)")
  logging.info("%d instance images (%s)", len(instances), ", ".join(sorted(captions)[:3]))
  prior = None
  if config.prior.weight > 0:
    prior = prior_records(config, base, c, sample_fn, (base_params, frozen), plan, data_dir, workdir, captions)
  size = base.data.image_size
  batches = _Batches(_dataset(instances, config.instance.batch_size, size, tc.tokenize, config.seed),
                     prior and _dataset(prior, config.prior.batch_size, size, tc.tokenize, config.seed + 1))

  # -- state and loop ------------------------------------------------------------------------
  spec = dataclasses.replace(c.spec, cond_dropout=config.train.cond_dropout, ema_decay=config.train.ema_decay)
  tx = trainer.build_optimizer(config)
  fresh = lambda tree: jax.tree.map(jnp.copy, tree)  # own buffers: the step donates the state, not the base
  init = lambda: steps.TrainState(step=jnp.zeros((), jnp.int32), params=fresh(tune.trained),
                                  ema_params=fresh(tune.trained), opt_state=tx.init(tune.trained),
                                  rng=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 5)))
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
  train_step = jax.jit(lambda s, b, f: steps.train_step(s, b, c.null_tokens, c.null_mask, model=tc.model, tx=tx,
                                                        spec=spec, frozen=f, encode=encode, compose=tune.compose),
                       donate_argnums=0)

  control = config.controlnet.conditioning if config.method == "controlnet" else None
  state, step, preempted = loop.train_loop(
      state, train_step=lambda s, b: train_step(s, b, train_frozen),
      next_batch=lambda: merged_batch(next(batches), config.prior.weight, control), num_steps=config.train.num_steps,
      checkpointer=checkpointer, data_iter=batches, writer=writer, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every, check=loop.check_finite)
  if preempted or step < config.train.num_steps:
    return state

  # -- outputs ----------------------------------------------------------------------------
  write_outputs(config, workdir, state.ema_params, tc)
  if not config.eval.prompts:
    scores = {}
  elif config.method == "controlnet":
    scores = evaluate_control(config, base, plan, c, sample_fn, (base_params, frozen), controlnet_of(tc.model),
                              state.ema_params, data_dir, workdir)
  else:  # compose gives the whole network: sampling gets the base's other frozen parts (the VAE) beside it
    tuned = (tune.compose(state.ema_params, train_frozen), frozen and {**frozen, "model": {}})
    models = {"tuned": (trainer.make_sample_fn(tc, plan), tuned, tc.tokenize)}
    if config.method != "textual_inversion":  # (the base cannot read the new token)
      models["base"] = (sample_fn, (base_params, frozen), c.tokenize)
    scores = evaluate(config, base, plan, models, instances, prior, workdir)
  scores |= {"trained_parameters": n_trained, "base_parameters": n_base, "method": config.method}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(scores, f, indent=2)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in _flat_scalars(scores).items()})
  writer.flush()
  return state


def write_outputs(config, workdir: str, trained, tc: trainer.Components) -> None:
  """The exchangeable files of what trained: ``lora.safetensors`` (the U-Net's adapters, diffusers format),
  ``learned_embeds.safetensors`` (the new token's rows, diffusers format) or ``controlnet/`` (a diffusers
  ``ControlNetModel`` folder); full fine-tuning has its checkpoint."""
  if config.method == "controlnet":
    save_controlnet(controlnet_of(tc.model), trained, os.path.join(workdir, CONTROLNET_FOLDER))
  elif config.method == "lora":
    write_unet_lora(os.path.join(workdir, LORA_FILE), trained)
  elif config.method == "textual_inversion":
    embedding = textual_inversion.Embedding(config.textual_inversion.token, (np.asarray(trained, np.float32),),
                                            "trained")
    textual_inversion.write_embedding(os.path.join(workdir, EMBEDDING_FILE), embedding)


def _flat_scalars(scores: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in scores.items():
    if isinstance(v, dict):
      out |= _flat_scalars(v, f"{prefix}{k}_")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[prefix + k] = v
  return out


def evaluate(config, base, plan, models: dict, instances, prior, workdir: str) -> dict:
  """Samples of each of ``models`` ({name: (sample_fn, params, tokenize)}: the tuned one and, for comparison, the
  base) for up to ``eval.prompts`` instance captions and as many prior captions, ``eval.samples_per_prompt`` each:
  ``finetune.png`` (a row per model and prompt) and, for a shapes base, per-attribute accuracy
  (``evaluate.shapes.attribute_accuracy``) of what each caption asks for."""
  from diffjax.evaluate.shapes import ATTRIBUTES, asked_attributes, attribute_accuracy

  n = config.eval.samples_per_prompt
  colours = _colours(config)
  groups = {"instance": _distinct(instances, config.eval.prompts)}
  if prior:
    groups["prior"] = _distinct(prior, config.eval.prompts)
  key = jax.random.fold_in(jax.random.key(config.seed), 6)
  shapes_base = base.data.name == "shapes_captions"
  scores, rows, labels = {}, [], []
  for name, examples in groups.items():
    prompts = list(examples)
    asked = [asked_attributes(examples[p], p, colours) for p in prompts] if shapes_base else [None]
    judged = all(q is not None for q in asked)
    wanted = {a: np.repeat([q[a] for q in asked], n) for a in ATTRIBUTES} if judged else None
    for which, (sample_fn, params, tokenize) in models.items():
      samples = trainer.generate(sample_fn, params, prompts, plan, base.sampler.guidance_scale, tokenize, n, key)
      rows.append(samples)
      labels += [f"{which}: {p}" for p in prompts]
      if judged:
        scores.setdefault(name, {})[which] = attribute_accuracy(samples, wanted, colours)
  images.save_labeled_grid(np.concatenate(rows), labels, os.path.join(workdir, "finetune.png"))
  logging.info("fine-tuning evaluation: %s", scores)
  return scores


def evaluate_control(config, base, plan, c: trainer.Components, sample_fn, params, net, net_params, data_dir: str,
                     workdir: str) -> dict:
  """The ControlNet ``net`` (parameters ``net_params``) on held-out layouts: the first ``eval.prompts x
  eval.samples_per_prompt`` examples of the base data's ``controlnet.eval_split``, each sampled once for its caption
  with its own control map by the base pipeline steered by ``net`` (``pipelines.controlnet.with_controlnets``, as the
  generation job runs it) and, for comparison, by the base alone (``sample_fn``, ``trainer.make_sample_fn`` of
  ``c``; ``params``: the base's (trained, frozen)). Per
  model: the mean IoU of the samples' shape masks with the control's mask (``shapes.control_map`` "mask" of both),
  the fraction with IoU >= 0.8, and for a shapes base the per-attribute accuracy. ``control.png``: rows of control
  maps, tuned samples, base samples."""
  from diffjax.evaluate.shapes import ATTRIBUTES, attribute_accuracy, mask_iou

  n = config.eval.prompts * config.eval.samples_per_prompt
  source = pipeline.load_source(base.data.name, config.controlnet.eval_split, data_dir)
  examples = [source[i] for i in range(min(n, len(source)))]
  real = np.stack([np.asarray(e["image"]) for e in examples]).astype(np.float32) / 127.5 - 1.0
  control = shapes.control_map(real, config.controlnet.conditioning)
  wanted_mask = shapes.control_map(real, "mask")[..., 0] > 0.5  # (N, H, W) bool
  captions = [pipeline.caption_text(e["caption"]) for e in examples]
  size = base.data.image_size
  steered = c._replace(pipe=pipelines.controlnet.with_controlnets(c.pipe, [net]))
  inputs = {"controlnet": net_params,
            "control": pipelines.controlnet.control_inputs(
                pipelines.controlnet.Control([control], scales=config.controlnet.scale), batch=len(examples),
                height=size, width=size, ts=plan.ts, denoise_final=plan.denoise_final, time_scale=c.pipe.time_scale)}
  runs = {"tuned": (trainer.make_sample_fn(steered, plan), inputs), "base": (sample_fn, None)}
  key = jax.random.fold_in(jax.random.key(config.seed), 7)
  scores, grid = {}, [np.round(control * 255).astype(np.uint8)]
  for which, (sample_fn, extra) in runs.items():
    samples = trainer.generate(sample_fn, params, captions, plan, base.sampler.guidance_scale, c.tokenize, 1, key,
                               extra)
    grid.append(samples)
    iou = mask_iou(samples, wanted_mask)
    scores[which] = {"mask_iou": float(iou.mean()), "iou_at_least_0.8": float((iou >= 0.8).mean())}
    if base.data.name == "shapes_captions":
      scores[which] |= attribute_accuracy(samples, {a: [e[a] for e in examples] for a in ATTRIBUTES})
  labels = ["control maps", "tuned (with control)", "base (no control)"]
  channels = grid[1].shape[-1]  # (a one-channel model's samples: its control maps in grey)
  grid[0] = grid[0][..., :channels]
  images.save_labeled_grid(np.concatenate(grid), labels, os.path.join(workdir, "control.png"))
  logging.info("ControlNet evaluation on %d %s layouts: %s", len(examples), config.controlnet.eval_split, scores)
  return {"num_layouts": len(examples), **scores}


def _distinct(records: list[dict], limit: int) -> dict[str, dict]:
  """{caption: its first record} for the first ``limit`` distinct captions."""
  out: dict[str, dict] = {}
  for r in records:
    out.setdefault(r["caption"], r)
    if len(out) == limit:
      break
  return out


def _colours(config) -> dict:
  """The shapes colours judged: the data's, and with ``eval.token_colour`` ("R,G,B") the textual-inversion token
  as a colour word of that RGB."""
  if not config.eval.get("token_colour"):
    return dict(shapes.COLOURS)
  try:
    rgb = tuple(int(v) for v in config.eval.token_colour.split(","))
  except ValueError:
    rgb = ()
  if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
    raise ConfigError(f"config.eval.token_colour = {config.eval.token_colour!r}: expected R,G,B in 0..255")
  return dict(shapes.COLOURS) | {config.textual_inversion.token: rgb}
