"""The generation job: ``generate(config, output_dir)`` writes images for prompts (and an init image).

The pretrained model is a diffusers Stable Diffusion folder (``model_index.json``), a
diffjax training workdir (``config.json`` and ``checkpoints/``, its latest EMA weights) or
an original single-file SD 1.x/2.x checkpoint (with ``config.tokenizer``). Tasks: txt2img,
img2img, inpaint (``pipelines.inpaint``), upscale (``pipelines.upscale``: 4x the image).
The config (``configs/generate.py``) is read and checked here, then turned into calls of
``diffjax.pipelines.generate``, ``config.batch_size`` images at a time with a progress bar.

Outputs in ``output_dir``: ``NNNN.png`` per image; ``samples.npz`` (``images`` uint8
(N, H, W, 3), ``prompts`` (N,), ``seeds`` (N,)); ``generation.json`` with everything needed
to reproduce each image (the config, the sampling plan, per-image prompt and seed, the
SHA-256 of every weight file read). ``config.lora``: LoRA files (diffusers or kohya format) merged
into the pipeline's weights, each with its scale. ``config.controlnet``: ControlNets (diffusers folders or original
single files, or the ``controlnet/`` a finetune job wrote) steering txt2img, img2img and inpainting of a Stable
Diffusion model or a diffjax U-Net workdir, one ``config.control_image`` each (``pipelines.controlnet``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from PIL import Image

from diffjax import images, pipelines, schema
from diffjax import watermark as wm
from diffjax.adapters import lora_files
from diffjax.convert import load_controlnet
from diffjax.convert.files import WeightFileError
from diffjax.convert.keys import WeightMismatchError
from diffjax.pipelines import calibrate
from diffjax.schema import ConfigError
from diffjax.train import trainer

DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack")
CHUNK = 1 << 22


def validate(config) -> None:
  """``ConfigError`` naming the field for an unknown, missing, mistyped or impossible setting (``diffjax.schema``'s
  generate family) or a pretrained path that cannot be one."""
  schema.validate(config, "generate")
  if not config.pretrained or not os.path.exists(config.pretrained):
    raise ConfigError(f"config.pretrained = {config.pretrained!r} does not exist: give a diffusers pipeline "
                      f"folder, a diffjax training workdir or a single-file SD checkpoint")
  if os.path.isfile(config.pretrained) and not config.tokenizer:
    raise ConfigError(f"config.tokenizer is empty: the single file {config.pretrained} holds no tokenizer; "
                      f"give a CLIP tokenizer folder (vocab.json + merges.txt)")


def use_compilation_cache(folder: str) -> None:
  """Turns on JAX's persistent compilation cache in ``folder`` (every program, however fast it compiled)."""
  if not folder:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(CHUNK):
      h.update(block)
  return h.hexdigest()


def weights_fingerprint(root: str, under: str = "") -> dict[str, str]:
  """{path relative to ``root``: SHA-256} of every weight file below ``root/under`` (orbax checkpoints: every file)."""
  top = os.path.join(root, under)
  out = {}
  for folder, _, names in sorted(os.walk(top)):
    for name in sorted(names):
      if under or name.endswith(WEIGHT_SUFFIXES):
        path = os.path.join(folder, name)
        out[os.path.relpath(path, root)] = _sha256(path)
  return out


def load(path: str, dtype=jnp.float32, tokenizer: str = "", prediction_type: str = ""
         ) -> tuple[pipelines.Pipeline, dict, dict]:
  """(pipeline, params, provenance) of a diffusers folder, a diffjax workdir (``config.json`` + checkpoints) or
  a single-file checkpoint (``tokenizer``: its tokenizer folder; ``prediction_type``: "" = the default)."""
  if os.path.isfile(path):
    try:
      pipe, params = pipelines.from_single_file(path, tokenizer=tokenizer, prediction_type=prediction_type or None,
                                                dtype=dtype)
    except FileNotFoundError as e:
      raise ConfigError(f"config.tokenizer: {e}") from None
    return pipe, params, {"kind": "single_file", "weights_sha256": {os.path.basename(path): _sha256(path)}}
  if os.path.isfile(os.path.join(path, "model_index.json")):
    pipe, params = pipelines.from_pretrained(path, dtype=dtype)
    return pipe, params, {"kind": "diffusers", "weights_sha256": weights_fingerprint(path)}
  config_path = os.path.join(path, trainer.CONFIG_FILE)
  if os.path.isfile(config_path) and os.path.isdir(os.path.join(path, "checkpoints")):
    with open(config_path) as f:
      train_config = ml_collections.ConfigDict(json.load(f))
    pipe, params, step = trainer.load_pipeline(train_config, path)
    return pipe, params, {"kind": "diffjax", "step": step,
                          "weights_sha256": weights_fingerprint(path, os.path.join("checkpoints", str(step)))}
  raise ConfigError(f"config.pretrained = {path!r} is neither a diffusers pipeline folder (model_index.json) nor a "
                    f"diffjax training workdir ({trainer.CONFIG_FILE} and checkpoints/)")


_LOADED: dict = {}  # the last pipeline loaded, by its files' state: a next job on the same files reuses its programs


def _files_state(path: str) -> tuple:
  """(relative path, size, mtime) of every file at or below ``path``: changes when any weight file does."""
  if os.path.isfile(path):
    st = os.stat(path)
    return ((os.path.basename(path), st.st_size, st.st_mtime_ns),)
  out = []
  for folder, _, names in sorted(os.walk(path)):
    for name in sorted(names):
      st = os.stat(os.path.join(folder, name))
      out.append((os.path.relpath(os.path.join(folder, name), path), st.st_size, st.st_mtime_ns))
  return tuple(out)


def load_cached(path: str, dtype=jnp.float32, tokenizer: str = "", prediction_type: str = ""):
  """``load``, or the same objects as the last call when the files are unchanged (so nothing recompiles)."""
  key = (os.path.abspath(path), jnp.dtype(dtype).name, tokenizer, prediction_type, _files_state(path),
         _files_state(tokenizer) if tokenizer and os.path.exists(tokenizer) else ())
  if key not in _LOADED:
    _LOADED.clear()  # one model at a time in memory
    _LOADED[key] = load(path, dtype, tokenizer, prediction_type)
  return _LOADED[key]


def lora_entry(entry: str) -> tuple[str, float]:
  """(path, scale) of a ``config.lora`` entry: ``"FILE"`` (scale 1) or ``"FILE:SCALE"``."""
  path, sep, scale = entry.rpartition(":")
  try:
    return (path, float(scale)) if sep else (entry, 1.0)
  except ValueError:
    return entry, 1.0  # a ':' inside the path


DIFFJAX_LORA_MODELS = {"unet": "denoiser", "text_encoder": "text_encoder"}  # file model name: workdir network part


def with_loras(config, params: dict, provenance: dict) -> tuple[dict, dict]:
  """``params`` with the LoRA files of ``config.lora`` merged in (``lora_files.merge_lora_files``), and
  ``provenance`` with each file's path, scale and SHA-256 (so a record or a calibration names them)."""
  entries = [lora_entry(e) for e in config.get("lora") or ()]
  if not entries:
    return params, provenance
  for path, _ in entries:
    if not os.path.isfile(path):
      raise ConfigError(f"config.lora: {path} is not a file (entries are FILE or FILE:SCALE)")
  # A diffjax workdir's network is {"model": {"denoiser", "text_encoder"}}: files name them 'unet', 'text_encoder'.
  views = DIFFJAX_LORA_MODELS if provenance.get("kind") == "diffjax" else {}
  models = {name: params["model"][inner] for name, inner in views.items()} if views else params
  try:
    merged = lora_files.merge_lora_files(models, *entries)
  except (WeightMismatchError, WeightFileError, ValueError) as e:
    raise ConfigError(f"config.lora: {e}") from None
  params = {**params, "model": {**params["model"], **{inner: merged[n] for n, inner in views.items()}}} if views \
      else merged
  files = [{"file": os.path.abspath(p), "scale": scale, "sha256": _sha256(p)} for p, scale in entries]
  return params, {**provenance, "lora": files}


def _image_file(config, field: str, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
  """The image of ``config.<field>`` (H, W, channels) in [0, 1], checked to be ``size`` (H, W) if given."""
  try:
    image = images.load_image(config[field], channels=channels)
  except ValueError as e:
    raise ConfigError(f"config.{field}: {e}") from None
  if size is not None and image.shape[:2] != size:
    hint = ("make the mask the init image's size" if field == "mask_image" else
            "resize it, or set config.height = config.width = 0 to take its size")
    raise ConfigError(f"config.{field} {config[field]} is {image.shape[1]}x{image.shape[0]} (W x H), the output "
                      f"{size[1]}x{size[0]}: {hint}")
  return image


def control_image(path: str, height: int, width: int) -> np.ndarray:
  """float32 (height, width, 3) in [0, 1] of a control image file, read as diffusers' ``control_image_processor``
  reads a PIL image: resized (Lanczos) to the output's size when it differs, then converted to RGB (an edge map may
  be grey), not normalised. ``ConfigError`` naming ``config.control_image`` and the file when it cannot be read."""
  try:
    with Image.open(path) as pil:
      pil.load()
      if pil.size != (width, height):
        pil = pil.resize((width, height), Image.LANCZOS)
      return np.asarray(pil.convert("RGB"), np.float32) / 255.0
  except (OSError, SyntaxError, ValueError) as e:
    raise ConfigError(f"config.control_image: {path} is not a readable image ({e})") from None


def _controlnet_files(path: str) -> dict[str, str]:
  """{file: SHA-256} of a ControlNet: the single file, or the weights of its diffusers folder (a pipeline folder's
  ``controlnet/``, as ``load_controlnet`` reads it)."""
  if os.path.isfile(path):
    return {os.path.basename(path): _sha256(path)}
  inner = os.path.join(path, "controlnet")
  if os.path.isfile(os.path.join(path, "config.json")) or not os.path.isfile(os.path.join(inner, "config.json")):
    return weights_fingerprint(path)
  return {os.path.join("controlnet", name): sha for name, sha in weights_fingerprint(inner).items()}


@functools.lru_cache(maxsize=1)
def _controlled(pipe: pipelines.Pipeline, paths: tuple[str, ...], dtype: str, state: tuple):
  """(pipeline with the ControlNets, their params, their files' SHA-256) of ``paths`` (``state``: the files' state,
  so a next job with the same files reuses the programs); ConfigError naming ``config.controlnet``."""
  nets, weights, files = [], [], []
  for path in paths:
    try:
      net, w = load_controlnet(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:  # missing, not a ControlNet, malformed or mismatched weights
      raise ConfigError(f"config.controlnet: {e}") from None
    nets.append(net)
    weights.append(w)
    files.append({"path": os.path.abspath(path), "weights_sha256": _controlnet_files(path)})
  try:
    return pipelines.controlnet.with_controlnets(pipe, nets), weights, files
  except ValueError as e:
    raise ConfigError(f"config.controlnet: {e}") from None


def with_controlnets(config, pipe: pipelines.Pipeline, params: dict, provenance: dict, height: int, width: int):
  """(pipeline, params, provenance, control) with ``config.controlnet``'s ControlNets in the pipeline and its params
  (``pipelines.controlnet``), each checked against the U-Net, and ``config.control_image``'s images read at height x
  width; provenance gets each ControlNet's path, weights' SHA-256 and control image. Unchanged (control None) when
  the config names no ControlNet."""
  paths = schema.control_field(config, "controlnet")
  if not paths:
    return pipe, params, provenance, None
  unet = pipelines.controlnet.unet_params(params)
  if config.task == "upscale" or unet is None:
    raise ConfigError(f"config.controlnet: ControlNets steer txt2img, img2img and inpaint of a Stable Diffusion folder "
                      f"or single file or a diffjax U-Net workdir, not task {config.task!r} of {config.pretrained}")
  pipe, weights, files = _controlled(pipe, paths, config.dtype, tuple(_files_state(p) for p in paths))
  for path, w in zip(paths, weights, strict=True):
    problem = pipelines.controlnet.unet_mismatch(w, unet)
    if problem:
      raise ConfigError(f"config.controlnet: {path} is a ControlNet for another U-Net: {problem}")
  names = schema.control_field(config, "control_image")
  setting = functools.partial(schema.control_field, config)
  control = pipelines.controlnet.Control([control_image(n, height, width) for n in names],
                                         setting("controlnet_scale"), setting("control_start"), setting("control_end"),
                                         setting("guess_mode"))
  files = [f | {"control_image": os.path.abspath(n), "control_image_sha256": _sha256(n)}
           for f, n in zip(files, names, strict=True)]
  return pipe, {**params, "controlnet": weights}, {**provenance, "controlnet": files}, control


def _inputs(config) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
  """(init image, mask, height, width): the image's size where the config says 0."""
  if config.task == "txt2img":
    return None, None, config.height, config.width
  image = _image_file(config, "init_image", 3)
  if config.task == "upscale":  # the output size follows from the image
    return image, None, image.shape[0], image.shape[1]
  size = (config.height or image.shape[0], config.width or image.shape[1])
  image = _image_file(config, "init_image", 3, size) if image.shape[:2] != size else image
  mask = _image_file(config, "mask_image", 1, size) if config.task == "inpaint" else None
  return image, mask, *size


def calibration_key(config, pipe: pipelines.Pipeline, provenance: dict, height: int, width: int) -> dict:
  """What a calibration of a pretrained pipeline is valid for: its weight files (SHA-256), the pipeline's
  fingerprint, the image size, the guidance (scale, rescale, negative prompt) and the LoRA files merged."""
  s = config.sampler
  return {"weights_sha256": provenance["weights_sha256"], "pipeline": pipe.fingerprint, "height": height,
          "width": width, "guidance_scale": float(s.guidance_scale), "guidance_rescale": float(s.guidance_rescale),
          "negative_prompt": config.negative_prompt,
          **({"lora": [{k: f[k] for k in ("sha256", "scale")} for f in provenance["lora"]]} if "lora" in provenance
             else {})}  # the files' contents and scales, wherever the files lie


def calibrate_pretrained(config, path: str) -> dict:
  """Fits samplers to the pretrained pipeline of ``config`` (``--mode=calibrate`` of a generation config) into
  ``path``: txt2img at ``height`` x ``width`` with ``config.calibration``'s budgets, batches, lattice, tolerance and
  seed, prompts drawn from ``calibration.prompts`` (default ``config.prompts``), guided as ``config.sampler`` and
  ``config.negative_prompt`` say. Sample with ``--config.sampler.name=fitted --config.sampler.calibration=PATH``."""
  validate(config)
  if config.task != "txt2img" or config.get("calibration") is None:
    raise ConfigError("config.task: calibration fits txt2img sampling (the fitted sampler then serves img2img and "
                      "inpainting too); set config.calibration (configs/generate.py has it)")
  use_compilation_cache(config.compilation_cache)
  pipe, params, provenance = load_cached(config.pretrained, DTYPES[config.dtype], config.tokenizer,
                                         config.prediction_type)
  params, provenance = with_loras(config, params, provenance)
  if isinstance(pipe, pipelines.InpaintingPipeline | pipelines.UpscalePipeline):
    raise ConfigError(f"config.pretrained = {config.pretrained}: calibration covers text-to-image pipelines, not "
                      f"{type(pipe).__name__}")
  cal, s = config.calibration, config.sampler
  key = calibration_key(config, pipe, provenance, config.height, config.width)
  return calibrate.calibrate(
      pipe, params, list(cal.get("prompts") or config.prompts), path, key=key, guidance_scale=float(s.guidance_scale),
      height=config.height, width=config.width, budgets=cal.budgets, batch=cal.batch,
      validation_batch=cal.validation_batch, seed=cal.seed, negative_prompt=config.negative_prompt,
      options=pipelines.Guidance(rescale=float(s.guidance_rescale)), log=logging.info, **calibrate.settings_from(cal))


def generate(config, output_dir: str) -> dict:
  """Runs the generation ``config`` describes into ``output_dir``; returns what ``generation.json`` holds."""
  validate(config)
  started = time.time()
  use_compilation_cache(config.compilation_cache)
  pipe, params, provenance = load_cached(config.pretrained, DTYPES[config.dtype], config.tokenizer,
                                         config.prediction_type)
  params, provenance = with_loras(config, params, provenance)
  s = config.sampler
  image, mask, height, width = _inputs(config)
  if s.name == calibrate.FITTED:
    plan = calibrate.fitted_plan(pipe.process, s.calibration, calibration_key(config, pipe, provenance, height, width),
                                 s.steps)
  else:
    try:
      plan = pipelines.plan_for(pipe, s.steps, s.name or None, s.grid, height=height, width=width,
                                **s.get("options", {}))
    except (ValueError, NotImplementedError) as e:
      raise ConfigError(f"config.sampler: {e}") from None
  # After the plan: a sampler fitted to the pretrained pipeline (its calibration key) serves it with ControlNets too.
  pipe, params, provenance, control = with_controlnets(config, pipe, params, provenance, height, width)
  strength = float(config.strength or DEFAULT_STRENGTH.get(config.task, 1.0))
  r = config.repaint
  repaint = pipelines.RePaint(r.jump_length, r.jump_n_sample) if r.jump_length else None
  if repaint is not None and (config.task != "inpaint" or isinstance(pipe, pipelines.InpaintingPipeline)):
    raise ConfigError("config.repaint is an option of inpainting with a model not trained for it")
  if (config.task == "upscale") != isinstance(pipe, pipelines.UpscalePipeline):
    raise ConfigError(f"config.task = {config.task!r} with {config.pretrained}: an x4 upscaler folder "
                      f"(StableDiffusionUpscalePipeline) does task 'upscale' and only that")
  if config.task in ("txt2img", "img2img") and isinstance(pipe, pipelines.InpaintingPipeline):
    raise ConfigError(f"config.task = {config.task!r}: {config.pretrained} is an inpainting model (9-channel "
                      f"U-Net); use task 'inpaint'")
  prompts = [p for p in config.prompts for _ in range(config.num_per_prompt)]
  seeds = [config.seed + i for i in range(len(prompts))]
  os.makedirs(output_dir, exist_ok=True)
  guidance = pipelines.Guidance(rescale=float(s.guidance_rescale))
  mark = wm.from_config(config.watermark, config.watermark_seed, config.watermark_radius)
  if mark.latent is not None and config.watermark_radius and config.task == "txt2img":  # the default fits or skips
    try:
      mark.latent.record(pipe.latent_shape(height, width))
    except ValueError as e:
      raise ConfigError(f"config.watermark_radius: {e}") from None
  records, pixels = [], []
  with tqdm.tqdm(total=len(prompts), unit="image", desc="generating", dynamic_ncols=True) as bar:
    for start in range(0, len(prompts), config.batch_size):
      batch = slice(start, start + config.batch_size)
      kw = dict(negative_prompts=[config.negative_prompt], height=height, width=width, plan=plan,
                guidance_scale=float(s.guidance_scale), guidance=guidance, seed=seeds[batch], strength=strength,
                watermark=mark)
      if config.task == "inpaint" and control is not None:
        out = pipelines.controlnet.inpaint(pipe, params, prompts[batch], image, mask, control, repaint=repaint, **kw)
      elif config.task == "inpaint":
        out = pipelines.inpaint(pipe, params, prompts[batch], image, mask, repaint=repaint, **kw)
      elif config.task == "upscale":
        kw = {k: v for k, v in kw.items() if k not in ("height", "width", "strength")}
        try:
          out = pipelines.upscale(pipe, params, prompts[batch], image, noise_level=config.noise_level, **kw)
        except ValueError as e:
          raise ConfigError(f"config.noise_level / config.init_image: {e}") from None
      elif control is not None:
        out = pipelines.controlnet.generate(pipe, params, prompts[batch], control, image=image, **kw)
      else:
        out = pipelines.generate(pipe, params, prompts[batch], image=image, **kw)
      for i, img in enumerate(images.to_uint8(out.images, 0.0, 1.0), start):
        name = f"{i:04d}.png"
        images.save_png(img, os.path.join(output_dir, name))
        pixels.append(img)
        records.append({"file": name, "prompt": prompts[i], "seed": seeds[i]})
      bar.update(len(out.images))
  common = {k: v for k, v in out.record.items() if k not in ("prompts", "seeds")}
  result = {"pretrained": os.path.abspath(config.pretrained), **provenance, **common,
            "images": records, "config": config.to_dict(), "seconds": round(time.time() - started, 2)}
  np.savez(os.path.join(output_dir, "samples.npz"), images=np.stack(pixels), prompts=np.asarray(prompts),
           seeds=np.asarray(seeds))
  result = json.loads(json.dumps(result))  # what the file holds (tuples as lists)
  with open(os.path.join(output_dir, "generation.json"), "w") as f:
    json.dump(result, f, indent=2)
  logging.info("wrote %d images (%dx%d, %s, %d steps) to %s: NNNN.png, samples.npz, generation.json", len(prompts),
               out.images.shape[2], out.images.shape[1], plan.name, len(plan.ts), output_dir)
  return result
