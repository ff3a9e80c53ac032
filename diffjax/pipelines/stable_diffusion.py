"""Stable Diffusion 1.x / 2.x from a diffusers pipeline folder: a ``Pipeline`` and its parameters.

A folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (diffusers
and transformers weights, read by ``diffjax.convert.load_pretrained``: sharded and fp16
files included), ``tokenizer/`` (CLIP ``vocab.json`` + ``merges.txt``) and
``scheduler/scheduler_config.json`` (``schedulers.DiffusersScheduler``). As diffusers'
``StableDiffusionPipeline`` does, an outdated scheduler config is read with
``steps_offset=1`` and ``clip_sample=False``, the text encoder sees no attention mask
(the CLIP configs of SD set no ``use_attention_mask``), the context is its last hidden
state, and latents are decoded as ``vae.decode(z / scaling_factor)``. A folder whose U-Net takes
2c + 1 channels (SD inpainting, c the VAE's latent channels) gives an ``inpaint.InpaintingPipeline``.
The SDXL and x4 upscaler loaders (``sdxl.py``, ``upscale.py``) build on this module's parts;
``folders.from_pretrained`` picks the loader a folder needs.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from diffjax.convert import load_pretrained
from diffjax.convert.files import read_json_config
from diffjax.models.tokenizers import CLIPTokenizer
from diffjax.pipelines import programs
from diffjax.pipelines.core import Pipeline
from diffjax.pipelines.inpaint import InpaintingPipeline
from diffjax.pipelines.schedulers import DiffusersScheduler

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
UPSCALER = "StableDiffusionUpscalePipeline"  # its folder also has a low_res_scheduler (upscale.py)
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # what an SDXL folder has besides REQUIRED (sdxl.py)
# SD3's and Flux's folders (sd3.py, flux.py): a transformer and two text encoders at least
TRANSFORMER_REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                        "scheduler")
PIXART_REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")  # one T5 encoder (pixart.py)


def names(index: dict, component: str) -> bool:
  """Whether a model_index names ``component`` (an entry ``[library, class]`` with a library)."""
  entry = index.get(component)
  return isinstance(entry, list) and bool(entry) and entry[0] is not None


def is_sd3(index: dict) -> bool:
  """Whether a model_index names an SD3 / SD3.5 pipeline class (sd3.py)."""
  return str(index.get("_class_name", "")).startswith("StableDiffusion3")


def is_flux(index: dict) -> bool:
  """Whether a model_index names a FLUX.1 pipeline class (flux.py)."""
  return str(index.get("_class_name", "")).startswith("Flux")


def is_pixart(index: dict) -> bool:
  """Whether a model_index names a PixArt pipeline class (pixart.py; its loader refuses classes other than
  PixArt-alpha's and PixArt-Sigma's)."""
  return str(index.get("_class_name", "")).startswith("PixArt")


def is_sdxl(index: dict) -> bool:
  """Whether a model_index names a second text encoder or an SDXL pipeline class (and is not SD3's, Flux's or
  PixArt's)."""
  named = names(index, "text_encoder_2")
  transformer = is_sd3(index) or is_flux(index) or is_pixart(index)
  return not transformer and (named or str(index.get("_class_name", "")).startswith("StableDiffusionXL"))


def check_folder(folder: str) -> dict:
  """The folder's model_index (checked: every component it needs is named and present)."""
  index_path = os.path.join(folder, "model_index.json")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} does not exist")
  if not os.path.isfile(index_path):
    raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
  index = read_json_config(index_path)
  if is_sd3(index):
    required = TRANSFORMER_REQUIRED + (("text_encoder_3", "tokenizer_3") if names(index, "text_encoder_3") else ())
  elif is_flux(index):
    required = TRANSFORMER_REQUIRED
  elif is_pixart(index):
    required = PIXART_REQUIRED
  else:
    required = REQUIRED + (("low_res_scheduler",) if index.get("_class_name") == UPSCALER else ())
    required += SDXL_PARTS if is_sdxl(index) else ()
  missing = [c for c in required if not names(index, c)
             or not os.path.isdir(os.path.join(folder, c))]
  if missing:
    raise ValueError(f"{index_path}: the pipeline lacks {', '.join(missing)} (need {', '.join(required)})")
  return index


def _tokenizer_json(path: str) -> tuple[dict, list]:
  """(vocab, merges) of a Hugging Face ``tokenizer.json`` with a BPE model (what transformers 5 saves)."""
  data = read_json_config(path)
  model = data.get("model")
  if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
    raise ValueError(f"{path}: expected a BPE tokenizer (model.type 'BPE' with a vocab), got {str(model)[:80]}")
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
  vocab = dict(model["vocab"]) | {t["content"]: t["id"] for t in data.get("added_tokens", [])}
  return vocab, merges


def load_tokenizer(folder: str) -> CLIPTokenizer:
  """The CLIP tokenizer of ``folder``: ``vocab.json`` + ``merges.txt`` or a ``tokenizer.json``, and the
  optional ``tokenizer_config.json`` (length, padding token)."""
  config_path = os.path.join(folder, "tokenizer_config.json")
  config = read_json_config(config_path) if os.path.isfile(config_path) else {}
  pad = config.get("pad_token")
  pad = pad.get("content") if isinstance(pad, dict) else pad  # transformers writes AddedToken dicts too
  max_length = config.get("model_max_length", 77)
  if not isinstance(max_length, int) or not 2 <= max_length <= 4096:  # some configs hold a huge sentinel
    max_length = 77
  files = [os.path.join(folder, n) for n in ("vocab.json", "merges.txt")]
  if all(os.path.isfile(f) for f in files):
    return CLIPTokenizer.from_files(*files, max_length=max_length, pad_token=pad)
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    vocab, merges = _tokenizer_json(os.path.join(folder, "tokenizer.json"))
    return CLIPTokenizer(vocab, merges, max_length=max_length, pad_token=pad)
  raise FileNotFoundError(f"{folder}: no CLIP tokenizer (need vocab.json and merges.txt, or tokenizer.json)")


def load_scheduler(folder: str, *, sd_rewrite: bool = True) -> DiffusersScheduler:
  """``scheduler_config.json`` of ``folder``; ``sd_rewrite``: with StableDiffusionPipeline's fixes of outdated
  configs (``steps_offset=1``, ``clip_sample=False``; SDXL's pipelines read the config as it is)."""
  path = os.path.join(folder, "scheduler_config.json")
  config = dict(read_json_config(path))
  if sd_rewrite and config.get("steps_offset", 1) != 1:  # StableDiffusionPipeline's rewrite of outdated configs
    config["steps_offset"] = 1
  if sd_rewrite and config.get("clip_sample", False) is True:
    config["clip_sample"] = False
  return DiffusersScheduler.from_config(config, where=path)


def load_models(folder: str, names, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[dict, dict]:
  """({name: module}, {name: params}) of the model subfolders ``names`` of a pipeline folder; ValueError naming
  every one that could not be read as a model folder."""
  loaded = load_pretrained(folder, dtype=dtype, param_dtype=param_dtype)
  absent = [n for n in names if n not in loaded]
  if absent:
    raise ValueError(f"{folder}: {', '.join(absent)} could not be read as a model folder")
  return {n: loaded[n][0] for n in names}, {n: loaded[n][1] for n in names}


def load_parts(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[tuple, dict]:
  """((unet, vae, text encoder, tokenizer, scheduler), params) of a one-encoder folder (SD 1.x/2.x, inpainting,
  the x4 upscaler); params {"unet", "vae", "text_encoder"}; ``dtype`` / ``param_dtype`` as in ``sd_from_pretrained``."""
  loaded = load_pretrained(folder, dtype=dtype, param_dtype=param_dtype)
  (unet, p_unet), (vae, p_vae), (text, p_text) = (loaded[k] for k in ("unet", "vae", "text_encoder"))
  tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
  scheduler = load_scheduler(os.path.join(folder, "scheduler"))
  return (unet, vae, text, tokenizer, scheduler), {"unet": p_unet, "vae": p_vae, "text_encoder": p_text}


def sd_from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[Pipeline, dict]:
  """(pipeline, params) of a Stable Diffusion 1.x/2.x (or SD inpainting) diffusers folder.

  ``params`` is {"unet", "vae", "text_encoder"}; ``dtype`` is the computation dtype of the
  networks (e.g. ``jnp.bfloat16``; the VAE decodes in float32 as diffusers' ``force_upcast``
  does), ``param_dtype`` that of the parameters. ``folders.from_pretrained`` picks this, SDXL's
  or the upscaler's loader by the folder's model_index.
  """
  folder = os.fspath(path)
  check_folder(folder)
  parts, params = load_parts(folder, dtype=dtype, param_dtype=param_dtype)
  return assemble(*parts, where=folder), params


def assemble(unet, vae, text, tokenizer: CLIPTokenizer, scheduler: DiffusersScheduler, *, where: str,
             image_channels: int = 0) -> Pipeline:
  """The SD 1.x/2.x ``Pipeline`` of loaded modules (params {"unet", "vae", "text_encoder"}); ``where`` names
  the source in errors. A U-Net of 2c + 1 input channels (c the VAE's) gives an ``InpaintingPipeline``;
  ``image_channels``: pixel channels the U-Net takes after the latents (the x4 upscaler's 3, ``upscale.py``).
  ``predict`` passes optional class labels (B,) and ``residuals`` on to the U-Net: a ControlNet's (down residuals,
  mid residual), added to its skips and middle block (``UNet.__call__``'s ``down_residuals``, ``mid_residual``)."""
  if vae.dtype != jnp.float32:  # decode in float32 (SD's VAE overflows in half precision)
    vae = vae.clone(dtype=jnp.float32)
  cfg = vae.config
  # An inpainting U-Net takes [latents, mask, masked-image latents]: an InpaintingPipeline (c = the VAE's channels).
  inpainting = not image_channels and unet.config.in_channels == 2 * cfg.latent_channels + 1
  if unet.config.in_channels != cfg.latent_channels + image_channels and not inpainting:
    raise NotImplementedError(f"{where}: a U-Net with {unet.config.in_channels} input channels for "
                              f"{cfg.latent_channels}-channel latents is not supported")

  def tokenize(prompts):
    ids = np.asarray(tokenizer(prompts).input_ids, np.int32)
    return ids, np.ones_like(ids)  # no attention mask, as SD's text encoders run (the causal mask alone)

  def encode_text(params, ids, mask):
    return text.apply({"params": params["text_encoder"]}, ids, None).last_hidden_state

  def predict(params, x, t, context, class_labels=None, residuals=None):
    down, mid = (None, None) if residuals is None else residuals
    return unet.apply({"params": params["unet"]}, x, t, context, class_labels, down_residuals=down,
                      mid_residual=mid).astype(jnp.float32)

  def decode(params, z):
    z = z.astype(jnp.float32) / cfg.scaling_factor + cfg.shift_factor
    return vae.apply({"params": params["vae"]}, z, method=vae.decode).astype(jnp.float32)

  def encode_image(params, images, noise):
    """Posterior sample mean + std * noise (noise: standard normal of the latent shape), scaled."""
    posterior = vae.apply({"params": params["vae"]}, images.astype(jnp.float32), method=vae.encode)
    z = posterior.mean + posterior.std * noise
    return ((z - cfg.shift_factor) * cfg.scaling_factor).astype(jnp.float32)

  kind = InpaintingPipeline if inpainting else Pipeline
  return kind(tokenize=tokenize, encode_text=encode_text, predict=predict, process=scheduler.process,
              target=scheduler.target, latent_channels=cfg.latent_channels, downsample=cfg.downsample_factor,
              decode=decode, encode_image=encode_image, scheduler=scheduler, max_length=tokenizer.max_length,
              count_tokens=lambda p: len(tokenizer.encode(p)) + 2,
              fingerprint=programs.fingerprint("stable_diffusion", kind.__name__, unet, vae, text, scheduler))
