"""``train_and_evaluate(config, workdir)``: text-to-image diffusion training, read top to bottom.

Sections: distributed setup and mesh; data; model; state (fresh or restored); jitted
steps; the loop (progress, logging, checkpoints, SIGTERM); final samples. The config
is read here and turned into typed arguments for everything below it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from diffjax import images, pipelines, processes, schema
from diffjax import watermark as wm
from diffjax.data import pipeline
from diffjax.evaluate.shapes import ATTRIBUTES, attribute_accuracy, real_shapes
from diffjax.models.mmdit import MMDiTConfig
from diffjax.models.text import CLIPTextConfig
from diffjax.models.text_to_image import TextToImage, pooled_width
from diffjax.models.tokenizers import ByteTokenizer
from diffjax.models.unet import UNetConfig
from diffjax.pipelines import Pipeline, programs, text_to_image
from diffjax.schema import ConfigError
from diffjax.train import latent, loop, sharding, steps
from diffjax.train import repa as repa_lib
from diffjax.train.checkpoint import Checkpointer

# ----------------------------------------------------------------------------------
# Config -> typed objects (the config stops here).
# ----------------------------------------------------------------------------------
CONFIG_FILE = "config.json"  # the training config, written into the workdir (what generation reads back)


def build_spec(config) -> steps.DiffusionSpec:
  d = config.diffusion
  return steps.DiffusionSpec(
      process=processes.make_process(d.process, **d.get("process_options", {})), target=d.target,
      weighting=d.weighting, weighting_options=tuple(sorted(d.get("weighting_options", {}).items())),
      time_sampler=d.time_sampler, time_sampler_options=tuple(sorted(d.get("time_sampler_options", {}).items())),
      time_scale=d.time_scale, cond_dropout=config.train.cond_dropout, ema_decay=config.train.ema_decay)


def sample_plan(config, process, params=None) -> pipelines.Plan:
  """The sampling plan of ``config.sampler``: its solver (and options) on its grid within its NFE, or for
  name 'fitted' the sampler of ``sampler.calibration`` for that NFE, which must have been calibrated for
  ``params`` (``pipeline_params`` of the trained weights that sample; None while training)."""
  s = config.sampler
  if s.name != schema.FITTED:
    return pipelines.Plan.native(process, s.name, s.nfe, s.grid, **s.get("options", {}))
  if params is None:
    raise ConfigError("sampler.name='fitted' is calibrated for trained weights: use it with --mode=sample, "
                      "evaluate or a sweep of a trained workdir, not while training")
  return pipelines.calibrate.fitted_plan(process, s.calibration, calibration_key(config, params), s.nfe)


def calibration_key(config, params) -> dict:
  """What a calibration is valid for: the weights that sample (``pipeline_params``; SHA-256 of every
  parameter), the process, target, image size and guidance scale."""
  d = config.diffusion
  return {"model": programs.fingerprint(params), "process": [d.process, dict(d.get("process_options", {}))],
          "target": d.target, "image_size": config.data.image_size,
          "guidance_scale": float(config.sampler.guidance_scale)}


def dataset_dir(config, workdir: str) -> str:
  """Where TFDS datasets are read or built: ``config.data.data_dir``, else ``WORKDIR/tfds``."""
  return config.data.data_dir or os.path.join(workdir, "tfds")


def build_model(config, latent=None) -> TextToImage:
  """The text-to-image network; with ``latent`` (``latent.LatentParts``) on its latents and text encoder.

  ``config.model.backbone`` (default "unet"): a U-Net (``model.channels``, ``attention_levels``, ...) or
  "mmdit", SD3's transformer (``model.width``, ``depth``, ``patch_size``, ``num_heads``, ``qk_norm``) on
  the image (or latent) patches with the text tokens in its joint attention.
  """
  m = config.model
  channels = config.data.channels if latent is None else latent.latent_shape[-1]
  side = config.data.image_size if latent is None else latent.latent_shape[0]
  text = CLIPTextConfig(vocab_size=ByteTokenizer.base_vocab_size, hidden_size=m.text_width,
                        intermediate_size=4 * m.text_width, num_layers=m.text_layers, num_heads=m.text_heads,
                        max_positions=config.data.max_caption_length, eos_token_id=ByteTokenizer.eos_id)
  if latent is not None and latent.text_config is not None:
    text = latent.text_config
  if m.get("backbone", "unet") == "mmdit":
    p = m.patch_size
    backbone = MMDiTConfig(sample_size=side, patch_size=p, in_channels=channels, out_channels=channels,
                           num_layers=m.depth, head_dim=m.width // m.num_heads, num_heads=m.num_heads,
                           joint_attention_dim=text.hidden_size, caption_projection_dim=m.width,
                           pooled_projection_dim=pooled_width(text), pos_embed_max_size=side // p,
                           qk_norm="rms_norm" if m.get("qk_norm", False) else None)
  else:
    backbone = UNetConfig(in_channels=channels, out_channels=channels,
                          block_out_channels=tuple(m.channels), layers_per_block=m.layers_per_block,
                          attention_levels=tuple(m.attention_levels), num_heads=m.num_heads,
                          cross_attention_dim=text.hidden_size, norm_num_groups=m.norm_groups, dropout=m.dropout,
                          mid_block_attention=m.mid_block_attention)
  return TextToImage(backbone=backbone, text=text, remat=m.remat, dtype=jnp.dtype(config.train.compute_dtype),
                     attention_impl=m.get("attention", "auto"))


def build_optimizer(config) -> optax.GradientTransformation:
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps, config.train.num_steps,
                                                end_value=o.learning_rate * o.final_lr_fraction)
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adamw(schedule, b1=o.b1, b2=o.b2,
                                                                        weight_decay=o.weight_decay))
  return optax.MultiSteps(tx, o.grad_accum_steps) if o.grad_accum_steps > 1 else tx


MESH_AXES, DEFAULT_RULES = sharding.MESH_AXES, sharding.DEFAULT_RULES  # (declared with the sharding rules)


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; config.mesh.data = -1 takes what fsdp leaves of ``num_devices``."""
  fsdp = config.mesh.fsdp
  return (config.mesh.data if config.mesh.data > 0 else num_devices // fsdp), fsdp


def make_mesh(config) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh over all devices (of all processes); see ``mesh_shape``."""
  validate_topology(config, jax.device_count(), jax.process_count())
  # Auto axes: XLA propagates the batch sharding through the model (no explicit-sharding annotations needed).
  return jax.make_mesh(mesh_shape(config, jax.device_count()), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` from ``config.distributed`` when it asks for more than one process.

  Must run before anything touches a JAX device. On CPU the processes reduce over gloo
  (JAX's default CPU collectives); a missing peer makes the others fail at start-up.
  """
  d = config.get("distributed")
  if d is None or d.num_processes <= 1 or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def tokenize_fn(max_length: int, tokenizer=None):
  """caption -> (2, L) int32 rows: token ids and attention mask (``tokenizer`` or bytes, padded to max_length)."""
  tok = tokenizer or ByteTokenizer(max_length=max_length)

  def tokenize(text: str) -> np.ndarray:
    t = tok(text)
    return np.stack([t.input_ids[0], t.attention_mask[0]])

  return tokenize


def validate(config) -> None:
  """Raises ``ConfigError`` (a ValueError) naming the field for unknown, missing, mistyped or impossible
  settings, before any work starts (``diffjax.schema``'s train family, then the latent files). Needs no
  devices (``validate_topology`` checks the mesh against them)."""
  schema.validate(config, "train")
  if config.get("vae"):
    try:
      latent.validate(config)  # FileNotFoundError (a missing first stage) passes as it is: main reports it in a line
    except ValueError as e:
      raise ConfigError(str(e)) from e


def _invalid(config, field: str, expected):
  section, key = field.split(".")
  raise ConfigError(f"config.{field} = {config[section][key]!r} is invalid: expected {expected}")


def validate_topology(config, num_devices: int, num_processes: int) -> None:
  """Raises ``ConfigError`` if the mesh or the batch does not fit ``num_devices`` over ``num_processes``."""
  data, fsdp = mesh_shape(config, num_devices)
  if fsdp > num_devices or num_devices % fsdp:
    _invalid(config, "mesh.fsdp", f"a divisor of the {num_devices} devices")
  if data * fsdp != num_devices:
    _invalid(config, "mesh.data", f"data x fsdp = {num_devices} devices (fsdp={fsdp}), or -1")
  if config.data.batch_size % num_devices:  # split over ('data', 'fsdp'), so also over the processes
    _invalid(config, "data.batch_size", f"a multiple of the data-parallel size data x fsdp = {num_devices}")


def load_train_source(config, data_dir: str):
  """The training split's random-access source; process 0 builds an embedded dataset first, the others wait."""
  if jax.process_index() != 0:
    multihost_utils.sync_global_devices("dataset prepared")
  source = pipeline.load_source(config.data.name, config.data.train_split, data_dir)
  if jax.process_index() == 0 and jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
  return source


class Components(NamedTuple):
  """What training and sampling build from a config."""

  spec: steps.DiffusionSpec
  model: TextToImage
  tx: optax.GradientTransformation
  tokenize: Callable[[str], np.ndarray]
  null_tokens: jax.Array  # (L,) the empty caption, for classifier-free guidance
  null_mask: jax.Array
  image_shape: tuple
  init_state: Callable[[], steps.TrainState]
  abstract_state: steps.TrainState  # shapes and dtypes only
  sample_key: jax.Array
  boxed_params: dict  # abstract params in nn.Partitioned boxes: their logical axis names, for sharding
  latent: object = None  # latent.LatentParts of a latent diffusion model (frozen VAE, text encoder)
  frozen: object = None  # parameters used but not trained (``steps.train_step``)
  pipe: Pipeline | None = None  # the model side of generation (``pipeline_params`` gives its parameters)
  tokenizer: object = None  # what ``tokenize`` and the pipeline tokenize with
  repa: repa_lib.RepaSpec | None = None  # representation alignment (``config.repa``), trained beside the model


def _text_to_image_pipe(model: TextToImage, spec: steps.DiffusionSpec, tokenizer, shape: tuple, lat) -> Pipeline:
  return text_to_image.from_model(model, process=spec.process, target=spec.target, tokenizer=tokenizer,
                                  image_shape=shape, time_scale=spec.time_scale, vae=lat and lat.vae)


def with_network(c: Components, model, tokenizer) -> Components:
  """``c`` with another network and tokenizer for the same images (textual inversion's added tokens and the larger
  token table they need): tokenize and pipeline follow; the empty caption's ids stay."""
  return c._replace(model=model, tokenizer=tokenizer, tokenize=tokenize_fn(tokenizer.max_length, tokenizer),
                    pipe=_text_to_image_pipe(model, c.spec, tokenizer, c.image_shape, c.latent))


def build_components(config) -> Components:
  lat = None
  if config.get("vae"):  # latent diffusion: a frozen VAE (and maybe text encoder) around the same network
    lat = latent.build(config)
  model, tx = build_model(config, lat), build_optimizer(config)
  tokenizer = (lat and lat.tokenizer) or ByteTokenizer(max_length=config.data.max_caption_length)
  tokenize = tokenize_fn(config.data.max_caption_length, tokenizer)
  k_init, k_train, k_sample = jax.random.split(jax.random.key(config.seed), 3)
  shape = (config.data.image_size, config.data.image_size, config.data.channels) if lat is None else lat.latent_shape
  repa = build_repa(config, lat)

  def init_boxed():
    tok = jnp.zeros((1, config.data.max_caption_length), jnp.int32)
    x, t = jnp.zeros((1,) + shape), jnp.zeros((1,))
    if lat is not None and lat.text_config is not None:  # the frozen text encoder's parameters stay out
      context = model.dummy_context(1, config.data.max_caption_length)
      params = model.init(k_init, x, t, context, method=model.predict)["params"]
    else:
      params = model.init(k_init, x, t, tok, tok)["params"]
    if repa is not None:
      tokens = jnp.zeros((1, 1, config.model.width))
      params = {**params, repa_lib.PARAMS: repa.projector.init(jax.random.fold_in(k_init, 1), tokens)["params"]}
    return params

  def init_state():
    params = flax.linen.meta.unbox(init_boxed())
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                            opt_state=tx.init(params), rng=jax.random.key_data(k_train))

  null_tokens, null_mask = (jnp.asarray(a) for a in tokenize(""))
  spec = build_spec(config)
  pipe = _text_to_image_pipe(model, spec, tokenizer, shape, lat)
  return Components(spec, model, tx, tokenize, null_tokens, null_mask, shape, init_state,
                    jax.eval_shape(init_state), k_sample, jax.eval_shape(init_boxed), lat, lat and lat.frozen, pipe,
                    tokenizer, repa)


def build_repa(config, lat) -> repa_lib.RepaSpec | None:
  """``config.repa`` (weight > 0) as a ``RepaSpec``: the MMDiT's tokens after block ``layer`` aligned through a
  ``projector_width`` MLP with the frozen VAE encoder's features of the batch's images, pooled to the patches."""
  r = config.get("repa")
  if r is None or not r.weight:
    return None
  features = lat.vae.config.block_out_channels[-1]
  return repa_lib.RepaSpec(weight=float(r.weight), layer=int(r.layer),
                           projector=repa_lib.Projector(hidden=int(r.projector_width), features=features),
                           patch=int(config.model.patch_size))


def pipeline_params(trained, frozen) -> dict:
  """The parameters of ``Components.pipe`` from the trained ones and the frozen ones (None in pixel space)."""
  trained = {k: v for k, v in trained.items() if k != repa_lib.PARAMS}  # REPA's projector trains, never samples
  params = {"model": steps.with_frozen(trained, frozen)}
  return params if frozen is None else params | {"vae": frozen["vae"]}


def make_sample_fn(c: Components, plan: pipelines.Plan, latent_mark: wm.LatentKey | None = None, **jit_options):
  """jitted ``(params, tokens, mask, key, ts, guidance_scale) -> images`` (B, H, W, C) in the data range:
  ``diffjax.pipelines.txt2img`` of ``c.pipe`` with ``plan``'s solver (ts: its grid) against the empty
  caption, decoded with the VAE of a latent model. ``params`` is the pair (trained params, ``c.frozen``);
  the initial noise is the standard normal drawn with the first half of ``key`` (with ``latent_mark``'s
  pattern written into it when given), the solver's randomness the second. ``inputs``: more entries of
  the pipeline's parameters (a ``controlnet.with_controlnets`` pipeline's "controlnet" and "control").
  ``jit_options`` go to ``jax.jit`` (shardings)."""

  def sample_fn(params, tok, m, key, ts, w, inputs=None):
    k_init, k_solver = jax.random.split(key)
    noise = jax.random.normal(k_init, tok.shape[:1] + tuple(c.image_shape))
    # (a latent too small to carry a detectable mark, watermark.latent.MIN_RANK, is left unmarked)
    noise, _ = wm.Watermark(pixel_bits=None, latent=latent_mark).mark_noise(noise, drawn=True)
    return pipelines.txt2img(c.pipe, pipeline_params(*params) | (inputs or {}), tok, m, c.null_tokens[None],
                             c.null_mask[None],
                             noise, ts, w, k_solver, solver=plan.solver, init_scale=plan.init_scale,
                             denoise_final=plan.denoise_final)

  return jax.jit(sample_fn, **jit_options)



# ----------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> steps.TrainState:
  """Trains per ``config``, checkpointing to and resuming from ``workdir``; returns the final state."""
  validate(config)
  # -- distributed setup and mesh ---------------------------------------------------
  initialize_distributed(config)
  mesh = make_mesh(config)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec(MESH_AXES))
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"), just_logging=not is_main)
  if is_main:  # the config beside the checkpoints: a workdir is then a pretrained model of its own
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # -- data ----------------------------------------------------------------------------
  c = build_components(config)
  data_dir = dataset_dir(config, workdir)
  source = load_train_source(config, data_dir)
  options = pipeline.ImageTextOptions(batch_size=config.data.batch_size // jax.process_count(),
                                      image_size=config.data.image_size, max_shift=config.data.max_shift)
  if c.latent is not None and config.data.cache_latents:
    dataset = latent.cached_dataset(c.latent, source, latent.cache_path(workdir, config.data.train_split),
                                    options.batch_size, c.tokenize, seed=config.seed,
                                    shard_index=jax.process_index(), shard_count=jax.process_count())
  else:
    dataset = pipeline.image_text_dataset(source, options, c.tokenize, seed=config.seed,
                                          shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = iter(dataset)

  # -- model, optimizer, state -----------------------------------------------------------
  model, spec, tx = c.model, c.spec, c.tx
  null_tokens, null_mask = c.null_tokens, c.null_mask
  # params, EMA and optimizer state sharded by the logical-axis rules (replicated when fsdp = 1)
  params_sharding = sharding.param_shardings(c.boxed_params, mesh, config.mesh.get("rules", DEFAULT_RULES))
  state_sharding = sharding.state_shardings(c.abstract_state, params_sharding, tx, mesh)
  logging.info("mesh %s; parameters: %s", dict(mesh.shape), sharding.describe(params_sharding))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints)
  restored = checkpointer.restore_latest(sharding.with_shardings(c.abstract_state, state_sharding))
  if restored is None:
    state = jax.jit(c.init_state, out_shardings=state_sharding)()
    logging.info("initialized a new model")
  else:
    state, data_state, step = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    logging.info("resumed from the checkpoint of step %d", step)
  if is_main and jax.process_count() == 1:  # statistics on the host: no compilation per shape and sharding
    parameter_overview.log_parameter_overview(jax.device_get(state.params))
  elif is_main:  # other processes hold parts of the arrays: shardings only
    parameter_overview.log_parameter_overview(state.params, include_stats="sharding")

  # -- jitted steps ------------------------------------------------------------------------
  encode = None if c.latent is None else c.latent.encode
  frozen = jax.device_put(c.frozen, replicated)  # None for a pixel-space model
  train_step = jax.jit(
      lambda s, b, f: steps.train_step(s, b, null_tokens, null_mask, model=model, tx=tx, spec=spec, frozen=f,
                                       encode=encode, repa=c.repa),
      in_shardings=(state_sharding, batch_sharding, replicated), out_shardings=(state_sharding, replicated, replicated),
      donate_argnums=0)
  plan = sample_plan(config, spec.process)
  # every process runs sampling (the parameters may be spread over all of them) and gets all images
  sample_fn = make_sample_fn(c, plan, watermark_of(config).latent,
                             in_shardings=((params_sharding, replicated),) + (replicated,) * 5,
                             out_shardings=replicated)

  def next_batch():
    local = next(data_iter)
    arrays = {k: v for k, v in local.items() if k != "tokens"} | {"tokens": local["tokens"][:, 0],
                                                                   "mask": local["tokens"][:, 1]}
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(batch_sharding, a), arrays)

  # -- loop ----------------------------------------------------------------------------------
  num_steps = config.train.num_steps
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every)]
  if is_main and config.train.get("profile_steps", 0):  # a TensorBoard profile of that many steps, once warm
    first_step = int(state.step)
    hooks.append(periodic_actions.Profile(logdir=os.path.join(workdir, "tensorboard"),
                                          num_profile_steps=config.train.profile_steps, profile_duration_ms=None,
                                          first_profile=first_step + min(10, max(1, (num_steps - first_step) // 2))))

  state, step, preempted = loop.train_loop(
      state, train_step=lambda s, b: train_step(s, b, frozen), next_batch=next_batch, num_steps=num_steps,
      checkpointer=checkpointer, data_iter=data_iter, writer=writer, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every, check=loop.check_finite, hooks=hooks)

  # -- evaluation ------------------------------------------------------------------------
  if not preempted and step >= num_steps:
    scores = evaluate(config, c, sample_fn, (state.ema_params, frozen), plan, data_dir, workdir, workdir,
                      judge=is_main)
    if is_main:
      writer.write_scalars(step, scores["scalars"])
      if "grid" in scores:
        writer.write_images(step, {"samples": scores["grid"][None]})
  writer.flush()
  return state


def evaluate(config, c: Components, sample_fn, params, plan: pipelines.Plan, data_dir: str, workdir: str,
             output_dir: str, judge: bool = True) -> dict:
  """Every evaluation the config asks for, with ``params`` = (EMA params, frozen params), sampled by ``plan``
  (``sample_fn`` is ``make_sample_fn`` of it).

  Writes to ``output_dir``: ``samples.png`` (a row per ``config.prompts``), the shapes
  grids, and ``eval.json`` (the digit scores and the per-split shapes scores in one dict).
  Returns {"scores": what eval.json holds, "scalars": {name: float} for the metric writer,
  "grid": uint8 (H, W, 3) if prompts were sampled}; {} on processes without ``judge``
  (they only sample).
  """
  os.makedirs(output_dir, exist_ok=True)
  out, scores, scalars = {}, {}, {}
  if config.get("prompts"):
    images_uint8 = generate(sample_fn, params, list(config.prompts), plan, config.sampler.guidance_scale, c.tokenize,
                            config.eval.samples_per_prompt, c.sample_key)
    if judge:
      out["grid"] = images.save_labeled_grid(images_uint8, config.prompts, os.path.join(output_dir, "samples.png"))
  if config.get("prompts") and config.eval.get("digits_per_prompt", 0):  # prompts[d] names digit d
    digits = evaluate_digits(sample_fn, params, config, plan, c.tokenize, data_dir, workdir, judge=judge)
    scores |= digits
    scalars |= {f"eval/{k}": v for k, v in digits.items() if isinstance(v, (int, float))}
    scalars |= {f"eval/{k}": m["value"] for k, m in digits.get("metrics", {}).items()}
  if config.eval.get("shapes_prompts", 0):
    shapes = evaluate_shapes(sample_fn, params, config, plan, c.tokenize, data_dir, workdir, output_dir, judge=judge)
    scores |= shapes
    scalars |= {f"eval/{split}_{k}": v for split, r in shapes.items() for k, v in r.items()
                if k in ATTRIBUTES + ("all",)}
    scalars |= {f"eval/{split}_{k}": m["value"] for split, r in shapes.items() for k, m in r["metrics"].items()}
  if not judge:
    return {}
  if scores:
    with open(os.path.join(output_dir, "eval.json"), "w") as f:
      json.dump(scores, f, indent=2)
  return out | {"scores": scores, "scalars": scalars}


def evaluate_digits(sample_fn, params, config, plan, tokenize, data_dir, workdir, judge: bool = True) -> dict:
  """Prompt accuracy and the sample metrics (with intervals) of samples for the 10 digit prompts.

  ``config.prompts[d]`` must name digit d. A classifier trained on real digits (shipped for
  8x8, else cached in workdir: ``features.digit_networks``) judges
  ``config.eval.digits_per_prompt`` samples per prompt. The sample
  metrics (``evaluate.metrics.compare``: Frechet distance, KID, precision/recall,
  density/coverage) compare a class-balanced subset of them, as large as the test split,
  with the real test digits in ``evaluate.features``' feature space; only the metrics that
  passed its sanity suite are reported (the verdict is cached in workdir), the rest are
  listed under "not_reported".
  With several processes all of them sample; only the one with ``judge`` (process 0)
  scores and writes, the others return {}.
  """
  from diffjax.evaluate import digits as digit_eval
  from diffjax.evaluate import features

  n = config.eval.digits_per_prompt
  key = jax.random.fold_in(jax.random.key(config.seed), 1)  # other noise than the grid's
  samples = generate(sample_fn, params, list(config.prompts), plan, config.sampler.guidance_scale, tokenize, n, key)
  if not judge:
    return {}
  size = config.data.image_size
  networks = features.digit_networks(workdir, data_dir, image_size=size, seed=config.seed)
  classifier, clf_accuracy, _ = digit_eval.load_digit_classifier(networks[0])
  labels = np.repeat(np.arange(len(config.prompts)), n)
  generated = samples.astype(np.float32) / 127.5 - 1.0
  scores = {"prompt_accuracy": digit_eval.prompt_accuracy(classifier, generated, labels),
            "classifier_test_accuracy": clf_accuracy, "num_samples": int(len(generated))}
  real, _ = digit_eval.real_digits(data_dir, "test", size)
  train = digit_eval.real_digits(data_dir, "train", size)
  count = min(len(real), len(generated))
  # Samples are prompt-major: taking the j-th sample of every prompt before the (j+1)-th keeps the subset balanced.
  balanced = generated[np.argsort(np.tile(np.arange(n), len(config.prompts)), kind="stable")[:count]]
  space = features.digit_feature_space(*networks, train[0])
  verdict = features.reportable(space, workdir, real, train, n=count, repeats=config.eval.get("sanity_repeats", 5))
  scores |= features.report(space, verdict, real, balanced, f"{count} samples vs {len(real)} test digits")
  logging.info("digit evaluation: %s", {k: v for k, v in scores.items() if k != "features"})
  return scores


def evaluate_shapes(sample_fn, params, config, plan, tokenize, data_dir, workdir, output_dir,
                    judge: bool = True) -> dict:
  """Per-attribute accuracy of samples for shapes captions, judged by ``diffjax.data.shapes.check``.

  For each split in ``config.eval.shapes_splits`` ("held_out": colour/shape pairs never
  trained on; "validation": the training pairs), the first ``config.eval.shapes_prompts``
  distinct captions of the split get ``config.eval.shapes_samples_per_prompt`` samples
  each. Returns {split: {"colour", "shape", "count", "position", "all"} -> accuracy,
  "num_samples", "prompts", and the sample metrics against that split's real images in
  ``features.shapes_feature_space`` (those that passed its sanity suite, as for the digits)}
  and writes ``output_dir/shapes_<split>.png`` (a row per caption).
  With several processes all of them sample; only the one with ``judge`` (process 0)
  scores and writes, the others return {}.
  """
  from diffjax.evaluate import features

  n, results, space = config.eval.shapes_samples_per_prompt, {}, None
  for i, split in enumerate(config.eval.shapes_splits):
    source = pipeline.load_source(config.data.name, split, data_dir)
    examples = {}
    for j in range(len(source)):
      e = source[j]
      examples.setdefault(pipeline.caption_text(e["caption"]), e)
      if len(examples) == config.eval.shapes_prompts:
        break
    prompts = list(examples)
    key = jax.random.fold_in(jax.random.key(config.seed), 2 + i)
    samples = generate(sample_fn, params, prompts, plan, config.sampler.guidance_scale, tokenize, n, key)
    if not judge:
      continue
    wanted = {a: np.repeat([int(examples[p][a]) for p in prompts], n) for a in ATTRIBUTES}
    results[split] = {**attribute_accuracy(samples, wanted), "num_samples": len(samples), "prompts": prompts}
    real = real_shapes(data_dir, split)[0]
    if space is None:
      train = features.shapes_real(data_dir)
      space = features.shapes_feature_space(features.shapes_network(workdir, data_dir, seed=config.seed), train[0])
      reference = real if split == "validation" else real_shapes(data_dir, "validation")[0]
      verdict = features.reportable(space, workdir, reference, train, n=len(samples),
                                    repeats=config.eval.get("sanity_repeats", 5))
    generated = samples.astype(np.float32) / 127.5 - 1.0
    results[split] |= features.report(space, verdict, real, generated, f"{len(samples)} samples vs {len(real)} "
                                      f"real {split} images")
    images.save_labeled_grid(samples, prompts, os.path.join(output_dir, f"shapes_{split}.png"), min_width=256)
  logging.info("shapes evaluation: %s", {s: {k: v for k, v in r.items() if k != "prompts"} for s, r in results.items()})
  return results


def generate(sample_fn, params, prompts, plan: pipelines.Plan, guidance_scale: float, tokenize, per_prompt: int,
             key, inputs=None) -> np.ndarray:
  """uint8 (len(prompts) * per_prompt, H, W, C) samples, prompt-major, on ``plan``'s grid (``inputs``:
  ``make_sample_fn``'s extra pipeline inputs)."""
  rows = [tokenize(p) for p in prompts for _ in range(per_prompt)]
  tok = jnp.asarray(np.stack([r[0] for r in rows]))
  mask = jnp.asarray(np.stack([r[1] for r in rows]))
  extra = () if inputs is None else (inputs,)  # (a sample_fn jitted with six in_shardings takes six arguments)
  x = sample_fn(params, tok, mask, key, jnp.asarray(plan.ts, jnp.float32), guidance_scale, *extra)
  return images.to_uint8(np.asarray(x))


def load_components(config, workdir: str, step: int | None = None):
  """(components, (EMA params, frozen params), step) of the newest checkpoint under ``workdir``, or of the
  checkpoint of training step ``step`` (FileNotFoundError naming the steps kept if there is none)."""
  validate(config)
  c = build_components(config)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  if step is not None:
    restored = checkpointer.restore(step, c.abstract_state)
  else:
    restored = checkpointer.restore_latest(c.abstract_state)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first")
  state, _, step = restored
  logging.info("sampling with the EMA weights of step %d", step)
  return c, (state.ema_params, c.frozen), step


def load_pipeline(config, workdir: str, step: int | None = None) -> tuple[Pipeline, dict, int]:
  """(pipeline, its parameters, step) of the newest checkpoint under ``workdir`` (or of ``step``): the EMA
  weights of the network the config describes, with its frozen VAE and text encoder (``pipeline_params``)."""
  c, (ema, frozen), step = load_components(config, workdir, step)
  return c.pipe, pipeline_params(ema, frozen), step


def watermark_of(config) -> wm.Watermark:
  """The marks of the config's samples (``config.watermark``, ``watermark_seed``, ``watermark_radius``; none for a
  config written before they existed)."""
  return wm.from_config(config.get("watermark", "none"), config.get("watermark_seed", wm.DEFAULT_LATENT_SEED),
                        config.get("watermark_radius", 0.0))


def sample_from_checkpoint(config, workdir: str, prompts, num_per_prompt: int, output_dir: str, seed: int = 0,
                           step: int | None = None):
  """Samples ``num_per_prompt`` images per prompt with the latest checkpoint's EMA weights (or ``step``'s).

  ``diffjax.pipelines.generate`` on ``load_pipeline``'s pipeline. Writes
  ``output_dir/samples.npz`` (``images`` uint8 (N, H, W, C), ``prompts`` (N,), prompt-major),
  ``output_dir/grid.png`` (one row per prompt, labelled) and ``output_dir/samples.json``
  (the generation record and the checkpoint's step). Sampler, NFE and guidance come from
  ``config.sampler``.
  """
  if not prompts:
    raise ValueError("give at least one prompt")
  pipe, params, step = load_pipeline(config, workdir, step)
  size = config.data.image_size
  out = pipelines.generate(pipe, params, [p for p in prompts for _ in range(num_per_prompt)], height=size,
                           width=size, plan=sample_plan(config, pipe.process, params),
                           guidance_scale=config.sampler.guidance_scale, seed=seed, watermark=watermark_of(config))
  imgs = images.to_uint8(out.images, 0.0, 1.0)
  os.makedirs(output_dir, exist_ok=True)
  np.savez(os.path.join(output_dir, "samples.npz"), images=imgs, prompts=np.asarray(out.record["prompts"]))
  with open(os.path.join(output_dir, "samples.json"), "w") as f:
    json.dump(out.record | {"workdir": os.path.abspath(workdir), "step": step}, f, indent=2)
  images.save_labeled_grid(imgs, prompts, os.path.join(output_dir, "grid.png"))
  return imgs


def evaluate_checkpoint(config, workdir: str, output_dir: str, step: int | None = None) -> dict:
  """Runs the config's evaluation on the latest checkpoint's EMA weights (or ``step``'s), writing to ``output_dir``.

  For ablations of a trained model: sampler, NFE, guidance and the evaluation sizes come
  from the config (overrides), so one training run serves any number of evaluations.
  Returns the scores written to ``output_dir/eval.json``.
  """
  c, params, step = load_components(config, workdir, step)
  plan = sample_plan(config, c.spec.process, pipeline_params(*params))
  data_dir = dataset_dir(config, workdir)
  scores = evaluate(config, c, make_sample_fn(c, plan, watermark_of(config).latent), params, plan, data_dir, workdir,
                    output_dir)["scores"]
  logging.info("evaluation of step %d written to %s", step, output_dir)
  return scores


def calibrate_checkpoint(config, workdir: str, path: str, step: int | None = None) -> dict:
  """Fits samplers (``diffjax.samplers.calibration``) to the latest checkpoint's EMA weights (or ``step``'s),
  written to ``path``.

  ``config.calibration``: ``budgets`` (evaluation counts), ``batch`` and ``validation_batch`` noises
  drawn from ``seed`` (never an evaluation's), each sample with a prompt drawn from ``prompts``
  (default ``config.prompts``) and guided with ``config.sampler.guidance_scale`` against the empty
  prompt, as the model is sampled; reference paths by dopri5 at ``tol``, ``chunk`` samples at a
  time, kept at ``lattice`` noise levels; each budget's grid search descends from ``restarts`` starting
  grids, within ``minutes`` for the whole calibration where it is > 0. The file is keyed by
  ``calibration_key``; sample with it by ``--config.sampler.name=fitted --config.sampler.calibration=PATH``.
  A killed calibration resumes.
  """
  cal = config.calibration
  pipe, params, step = load_pipeline(config, workdir, step)
  prompts = list(cal.get("prompts") or config.get("prompts") or ())
  if not prompts:
    raise ValueError("calibration.prompts (or config.prompts) must name the prompts to calibrate with")
  logging.info("calibrating step %d for %s evaluations into %s", step, tuple(cal.budgets), path)
  size = config.data.image_size
  return pipelines.calibrate.calibrate(
      pipe, params, prompts, path, key=calibration_key(config, params),
      guidance_scale=float(config.sampler.guidance_scale), height=size, width=size, budgets=cal.budgets,
      batch=cal.batch, validation_batch=cal.validation_batch, seed=cal.seed, log=logging.info,
      **pipelines.calibrate.settings_from(cal))
