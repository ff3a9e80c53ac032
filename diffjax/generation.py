"""The generation job: ``generate(config, output_dir)`` writes images for prompts (and an init image).

The pretrained model is a diffusers Stable Diffusion folder (``model_index.json``) or a
diffjax training workdir (``config.json`` and ``checkpoints/``, its latest EMA weights).
The config (``configs/generate.py``) is read and checked here, then turned into calls of
``diffjax.pipelines.generate``, ``config.batch_size`` images at a time with a progress bar.

Outputs in ``output_dir``: ``NNNN.png`` per image; ``samples.npz`` (``images`` uint8
(N, H, W, 3), ``prompts`` (N,), ``seeds`` (N,)); ``generation.json`` with everything needed
to reproduce each image (the config, the sampling plan, per-image prompt and seed, the
SHA-256 of every weight file read).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from diffjax import images, pipelines
from diffjax.train import trainer
from diffjax.train.schema import ConfigError, check_fields

TASKS = ("txt2img", "img2img")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_NUMBER = (int, float)
FIELDS = {
    "job": str, "pretrained": str, "task": str, "prompts": (tuple, list), "negative_prompt": str,
    "num_per_prompt": int, "height": int, "width": int, "init_image": str, "strength": _NUMBER, "seed": int,
    "batch_size": int, "dtype": str,
    "sampler": dict(name=str, grid=str, steps=int, options=Mapping, guidance_scale=_NUMBER, guidance_rescale=_NUMBER),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack")
CHUNK = 1 << 22


def validate(config) -> None:
  """``ConfigError`` naming the field for an unknown, missing, mistyped or impossible setting."""
  check_fields(config, FIELDS, optional=frozenset({"sampler.options"}))
  if not config.pretrained or not os.path.isdir(config.pretrained):
    raise ConfigError(f"config.pretrained = {config.pretrained!r} is not a folder: give a diffusers pipeline "
                      f"folder or a diffjax training workdir")
  if config.task not in TASKS:
    raise ConfigError(f"config.task = {config.task!r}: expected one of {TASKS}")
  if not config.prompts or not all(isinstance(p, str) for p in config.prompts):
    raise ConfigError(f"config.prompts = {config.prompts!r}: expected a non-empty tuple of strings")
  for name, value in (("num_per_prompt", config.num_per_prompt), ("batch_size", config.batch_size),
                      ("sampler.steps", config.sampler.steps)):
    if value < 1:
      raise ConfigError(f"config.{name} = {value} must be >= 1")
  if config.dtype not in DTYPES:
    raise ConfigError(f"config.dtype = {config.dtype!r}: expected one of {sorted(DTYPES)}")
  if config.task == "img2img":
    if not 0.0 < config.strength <= 1.0:
      raise ConfigError(f"config.strength = {config.strength} must be in (0, 1]")
    if not config.init_image:
      raise ConfigError("config.init_image is empty: img2img needs an RGB image file")
  for side in ("height", "width"):
    if config[side] < 0 or (config[side] == 0 and config.task != "img2img"):
      raise ConfigError(f"config.{side} = {config[side]} must be positive (0 only for img2img: the image's size)")


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


def load(path: str, dtype=jnp.float32) -> tuple[pipelines.Pipeline, dict, dict]:
  """(pipeline, params, provenance) of a diffusers folder or a diffjax workdir (``config.json`` + checkpoints)."""
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


def _init_image(config) -> tuple[np.ndarray, int, int]:
  """The img2img image (H, W, 3) in [0, 1] and the output size (the image's where config says 0)."""
  try:
    image = images.load_image(config.init_image, channels=3)
  except ValueError as e:
    raise ConfigError(f"config.init_image: {e}") from None
  h, w = config.height or image.shape[0], config.width or image.shape[1]
  if image.shape[:2] != (h, w):
    raise ConfigError(f"config.init_image {config.init_image} is {image.shape[1]}x{image.shape[0]} (W x H), the "
                      f"output {w}x{h}: resize it, or set config.height = config.width = 0 to take its size")
  return image, h, w


def generate(config, output_dir: str) -> dict:
  """Runs the generation ``config`` describes into ``output_dir``; returns what ``generation.json`` holds."""
  validate(config)
  started = time.time()
  pipe, params, provenance = load(config.pretrained, DTYPES[config.dtype])
  s = config.sampler
  try:
    plan = pipelines.plan_for(pipe, s.steps, s.name or None, s.grid, **s.get("options", {}))
  except (ValueError, NotImplementedError) as e:
    raise ConfigError(f"config.sampler: {e}") from None
  image, height, width = (None, config.height, config.width)
  if config.task == "img2img":
    image, height, width = _init_image(config)
  prompts = [p for p in config.prompts for _ in range(config.num_per_prompt)]
  seeds = [config.seed + i for i in range(len(prompts))]
  os.makedirs(output_dir, exist_ok=True)
  guidance = pipelines.Guidance(rescale=float(s.guidance_rescale))
  records, pixels = [], []
  with tqdm.tqdm(total=len(prompts), unit="image", desc="generating", dynamic_ncols=True) as bar:
    for start in range(0, len(prompts), config.batch_size):
      batch = slice(start, start + config.batch_size)
      out = pipelines.generate(pipe, params, prompts[batch], negative_prompts=[config.negative_prompt],
                               height=height, width=width, plan=plan, guidance_scale=float(s.guidance_scale),
                               guidance=guidance, seed=seeds[batch], image=image, strength=float(config.strength))
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
               width, height, plan.name, len(plan.ts), output_dir)
  return result
