"""CLIP score (Hessel et al. 2021): 100 max(cos(image embedding, text embedding), 0), with user-provided weights.

  model, params, tokenizer = load_clip("clip-vit-base-patch32/")   # a transformers CLIPModel folder
  clip_score(model, params, tokenizer, images, prompts)             # images (N, H, W, 3) uint8 or [0, 1]

``preprocess`` is what transformers' ``CLIPImageProcessor`` does by default: RGB uint8 (float
images in [0, 1] are rounded to uint8 first, as saving a PNG would), the shorter side resized to
the tower's ``image_size`` with PIL's bicubic filter (the longer one to ``int(size * long /
short)``), a centred crop, /255 and CLIP's per-channel mean and std. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffjax.convert.configs import clip_config_from_transformers
from diffjax.convert.files import find_weights, read_json_config
from diffjax.convert.keys import IGNORED_KEYS, flax_from_state_dict
from diffjax.evaluate.batching import apply_in_batches
from diffjax.models.clip import CLIPModel
from diffjax.models.tokenizers import CLIPTokenizer
from diffjax.pipelines.stable_diffusion import load_tokenizer

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _uint8(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
    raise ValueError(f"need RGB images (N >= 1, H, W, 3), got shape {images.shape}")
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating) or images.min() < 0.0 or images.max() > 1.0:
    raise ValueError("images must be uint8, or float in [0, 1]")
  return np.round(images * 255.0).astype(np.uint8)


def preprocess(images, size: int = 224) -> np.ndarray:
  """(N, size, size, 3) float32 pixel values of images (N, H, W, 3) uint8 or float in [0, 1] (module docstring)."""
  out = []
  for image in _uint8(images):
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
    out.append(((crop - MEAN) / STD).astype(np.float32))
  return np.stack(out)


def params_from_state_dict(model: CLIPModel, state, what: str = "checkpoint") -> dict:
  """CLIPModel params from a transformers ``CLIPModel`` state dict {name: array}."""
  c = model.config.vision
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, c.image_size, c.image_size, 3)),
                                         jnp.zeros((1, model.config.text.max_positions), jnp.int32))["params"])
  return flax_from_state_dict(state, shapes, ignore=IGNORED_KEYS, what=what, convert=jnp.asarray)


def load_clip(folder: str | os.PathLike) -> tuple[CLIPModel, dict, CLIPTokenizer]:
  """(model, params, tokenizer) of a transformers CLIPModel folder (config.json, model.safetensors, tokenizer files)."""
  folder = os.fspath(folder)
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"{folder}: no config.json (expected a transformers CLIPModel folder)")
  model = CLIPModel(clip_config_from_transformers(read_json_config(os.path.join(folder, "config.json")), folder))
  params = params_from_state_dict(model, find_weights(folder, ("model",)), what=folder)
  return model, params, load_tokenizer(folder)


@functools.partial(jax.jit, static_argnums=0)
def _cosines(model: CLIPModel, params, pixels, ids):
  image, text, _ = model.apply({"params": params}, pixels, ids)
  norm = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  return jnp.sum(norm(image) * norm(text), axis=-1)


def clip_scores(model: CLIPModel, params, tokenizer: CLIPTokenizer, images, prompts,
                batch_size: int = 32) -> np.ndarray:
  """(N,) 100 max(cos, 0) of image i and prompt i."""
  prompts = list(prompts)
  pixels = preprocess(images, model.config.vision.image_size)
  if len(prompts) != len(pixels):
    raise ValueError(f"need one prompt per image: {len(pixels)} images, {len(prompts)} prompts")
  ids = np.asarray(tokenizer(prompts).input_ids, np.int32)
  cosines = apply_in_batches(lambda rows: _cosines(model, params, pixels[rows], ids[rows]), np.arange(len(pixels)),
                             batch_size)
  return 100.0 * np.maximum(cosines, 0.0)


def clip_score(model: CLIPModel, params, tokenizer: CLIPTokenizer, images, prompts) -> float:
  """The mean CLIP score of images (N, H, W, 3) and their prompts (N,)."""
  return float(np.mean(clip_scores(model, params, tokenizer, images, prompts)))
