"""Latent diffusion (Rombach et al. 2022): the text-to-image trainer on the latents of a frozen VAE.

The first stage (``diffjax.train.vae_trainer.train_vae``) exports its autoencoder as a
diffusers ``AutoencoderKL`` folder ``<vae workdir>/vae`` whose ``config.json`` holds the
latent ``scaling_factor`` (1 / std of the latents). Here that VAE is loaded and frozen:
the diffusion model learns x0 = scaling_factor * (z - shift_factor) with z a fresh sample
of the posterior q(z | image) at every step (Stable Diffusion's practice), encoded
either inside the jitted step or read from a cache of the posterior means and standard
deviations of the whole training split (``config.data.cache_latents``). Samples are
decoded with the VAE.

The text encoder is trained with the U-Net (``config.text.mode = "joint"``, the CLIP-style
byte-level encoder of the pixel-space trainer) or is a pretrained BERT or CLIP text
model read with ``diffjax.convert.load_pretrained(config.text.path)`` and frozen
(``"frozen_pretrained"``): its parameters then live outside the training state.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffjax.convert import load_pretrained
from diffjax.convert.files import write_atomically
from diffjax.data import pipeline
from diffjax.models.text import BertEncoder, CLIPTextTransformer
from diffjax.models.tokenizers import CLIPTokenizer, WordPieceTokenizer
from diffjax.models.vae import AutoencoderKL
from diffjax.pipelines import vae as vae_codec
from diffjax.schema import TEXT_MODES

VAE_FOLDER = "vae"  # under the first stage's workdir
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


class LatentParts(NamedTuple):
  """The frozen pieces of a latent text-to-image model (built from the config by ``build``).

  Attributes:
    frozen: parameters used but never trained, {"vae": VAE params, "model": {} or
      {"text_encoder": params of a frozen pretrained text encoder}} (see ``steps.train_step``).
    latent_shape: (h, w, c) of the diffusion data.
    encode: ``(frozen, batch, key) -> x0`` (B, h, w, c) scaled latents: a posterior sample
      of ``batch["image"]`` or, with the cache, of {"latent_mean", "latent_std"};
      ``encode(..., features=True) -> (x0, the VAE encoder's mid-block features of the same pass)``.
    decode: ``(frozen, x0) -> images`` (B, H, W, C) in about [-1, 1].
    text_config: the frozen text encoder's architecture (None: trained jointly).
    tokenizer: its tokenizer (None: the byte tokenizer of the joint encoder).
    vae: the autoencoder module; vae_path: its folder.
  """

  frozen: dict
  latent_shape: tuple
  encode: Callable
  decode: Callable
  text_config: Any
  tokenizer: Any
  vae: AutoencoderKL
  vae_path: str


def vae_folder(workdir: str) -> str:
  """``workdir/vae``, the exported first-stage VAE; FileNotFoundError saying what to run if it is missing."""
  folder = os.path.join(workdir, VAE_FOLDER)
  if not workdir or not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(
        f"config.vae.workdir={workdir!r} holds no trained VAE (expected {folder}/config.json, written at the end "
        f"of the first stage): run python -m diffjax.main --config=configs/shapes_vae.py --workdir=DIR first and "
        f"pass --config.vae.workdir=DIR")
  return folder


def validate(config) -> None:
  """Raises (ValueError, FileNotFoundError) for latent settings that cannot work, before any work starts."""
  if config.text.mode not in TEXT_MODES:
    raise ValueError(f"config.text.mode = {config.text.mode!r} is invalid: expected one of {TEXT_MODES}")
  if config.text.mode == "frozen_pretrained" and not os.path.isdir(config.text.path or ""):
    raise FileNotFoundError(f"config.text.path = {config.text.path!r} is not a folder: text.mode=frozen_pretrained "
                            f"needs a transformers BERT or CLIP text model folder")
  if config.data.get("cache_latents") and config.data.max_shift:
    raise ValueError("config.data.cache_latents=True encodes each image once: set config.data.max_shift=0")
  vae_folder(config.vae.workdir)


def load_vae(workdir: str) -> tuple[AutoencoderKL, dict]:
  """(module, params) of the VAE that ``train_vae`` exported to ``workdir``."""
  vae, params = load_pretrained(vae_folder(workdir))
  if not isinstance(vae, AutoencoderKL):
    raise ValueError(f"{vae_folder(workdir)} holds a {type(vae).__name__}, not an AutoencoderKL")
  return vae, params


def load_text_encoder(path: str, max_length: int):
  """(architecture config, params, tokenizer) of a pretrained BERT (vocab.txt) or CLIP (vocab.json, merges.txt)."""
  module, params = load_pretrained(path)
  if isinstance(module, BertEncoder):
    tokenizer = WordPieceTokenizer.from_file(os.path.join(path, "vocab.txt"), max_length=max_length)
  elif isinstance(module, CLIPTextTransformer):
    tokenizer = CLIPTokenizer.from_files(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                                         max_length=max_length)
  else:
    raise ValueError(f"config.text.path={path!r} holds a {type(module).__name__}, not a BERT or CLIP text model")
  return module.config, params, tokenizer


def build(config) -> LatentParts:
  """The frozen VAE (and text encoder) of ``config`` with its encode and decode functions."""
  validate(config)
  vae, vae_params = load_vae(config.vae.workdir)
  f = vae.config.downsample_factor
  if config.data.image_size % f:
    raise ValueError(f"config.data.image_size={config.data.image_size} is not a multiple of the VAE's "
                     f"downsampling factor {f}")
  shape = (config.data.image_size // f, config.data.image_size // f, vae.config.latent_channels)
  if config.model.get("backbone", "unet") == "mmdit":
    if shape[0] % config.model.patch_size:
      raise ValueError(f"the {shape[0]}x{shape[1]} latents do not split into config.model.patch_size="
                       f"{config.model.patch_size} patches")
  elif shape[0] % 2 ** (len(config.model.channels) - 1):
    raise ValueError(f"the {shape[0]}x{shape[1]} latents cannot be halved len(config.model.channels) - 1 = "
                     f"{len(config.model.channels) - 1} times: use fewer U-Net levels")
  frozen, text_config, tokenizer = {"vae": vae_params, "model": {}}, None, None
  if config.text.mode == "frozen_pretrained":
    text_config, text_params, tokenizer = load_text_encoder(config.text.path, config.data.max_caption_length)
    frozen["model"] = {"text_encoder": text_params}
  c = vae.config
  cached = bool(config.data.get("cache_latents"))

  def encode(fz, batch, key, features=False):
    if cached:
      if features:  # (the schema refuses REPA with cached latents: this is for direct callers)
        raise ValueError("the encoder's features need the images: config.data.cache_latents=False")
      mean, std = batch["latent_mean"], batch["latent_std"]
    else:
      mean, std, *h = vae_codec.posterior(vae, fz["vae"], batch["image"], features=features)
    x0 = vae_codec.scaled_latents(vae, mean, std, jax.random.normal(key, mean.shape, mean.dtype))
    return (x0, h[0]) if features else x0

  decode = lambda fz, x: vae_codec.decode(vae, fz["vae"], x)
  logging.info("latent diffusion on %s latents of the VAE in %s (scaling factor %.5g); text encoder: %s", shape,
               config.vae.workdir, c.scaling_factor, config.text.mode)
  return LatentParts(frozen, shape, encode, decode, text_config, tokenizer, vae, vae_folder(config.vae.workdir))


# -- the latent cache ----------------------------------------------------------------------------------------------
class LatentCache:
  """Random-access source over cached posteriors: ``cache[i]`` = {"latent_mean", "latent_std" (h, w, c), "caption",
  "index"}, example i of the encoded split (a grain ``MapDataset`` source)."""

  def __init__(self, mean: np.ndarray, std: np.ndarray, captions: np.ndarray):
    self.mean, self.std, self.captions = mean, std, captions

  def __len__(self) -> int:
    return len(self.mean)

  def __getitem__(self, i):
    return {"latent_mean": self.mean[i], "latent_std": self.std[i], "caption": self.captions[i], "index": i}


def cache_path(workdir: str, split: str) -> str:
  """WORKDIR/latents/<split>.npz, the split's name made a file name ("train[:512]" -> "train__512_")."""
  return os.path.join(workdir, "latents", re.sub(r"[^\w.-]", "_", split) + ".npz")


def _fingerprint(vae_path: str) -> str:
  with open(os.path.join(vae_path, VAE_WEIGHTS), "rb") as f:
    return hashlib.sha1(f.read()).hexdigest()


def encode_split(vae: AutoencoderKL, params, source, path: str, vae_path: str, batch_size: int = 256) -> LatentCache:
  """Encodes every image of ``source`` once (posterior mean and std, float32) into ``path`` (.npz) and returns it.

  An existing file made by the same VAE weights (SHA-1 of the safetensors file) is
  reused; the file is written under a temporary name and renamed, so a crash never
  leaves a partial cache.
  """
  fingerprint = _fingerprint(vae_path)
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f["vae_sha1"]) == fingerprint and len(f["mean"]) == len(source):
        return LatentCache(f["mean"], f["std"], f["captions"])
    logging.warning("latent cache %s was made by other VAE weights or data: encoding again", path)
  encode = jax.jit(lambda x: vae_codec.posterior(vae, params, x))
  means, stds, captions = [], [], []
  for start in range(0, len(source), batch_size):
    examples = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    images = np.stack([np.asarray(e["image"]) for e in examples]).astype(np.float32) / 127.5 - 1.0
    m, s = encode(jnp.asarray(images))
    means.append(np.asarray(m))
    stds.append(np.asarray(s))
    captions += [pipeline.caption_text(e["caption"]) for e in examples]
  cache = LatentCache(np.concatenate(means), np.concatenate(stds), np.asarray(captions))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_atomically(path, lambda tmp: np.savez(tmp, mean=cache.mean, std=cache.std, captions=cache.captions,
                                              vae_sha1=fingerprint), suffix=".npz")
  logging.info("cached the latents of %d images in %s", len(cache), path)
  return cache


def cached_dataset(parts: LatentParts, source, path: str, batch_size: int, tokenize, *, seed: int,
                   shard_index: int = 0, shard_count: int = 1):
  """The training batches (``pipeline.latent_text_dataset``) over the cached latents of ``source``."""
  cache = encode_split(parts.vae, parts.frozen["vae"], source, path, parts.vae_path)
  return pipeline.latent_text_dataset(cache, batch_size, tokenize, seed=seed, shard_index=shard_index,
                                      shard_count=shard_count)
