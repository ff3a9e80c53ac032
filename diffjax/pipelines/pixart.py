"""PixArt-alpha / PixArt-Sigma (Chen et al. 2023, 2024) from a diffusers folder: a ``Pipeline`` and its parameters.

What diffusers' ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline`` compute for txt2img, as one
``PixArtPipeline`` (a ``core.Pipeline``) that ``generate.generate`` runs, or ``generate`` below with
diffusers' resolution binning:

* One T5 encoder (``text_encoder``) sees the prompt padded / truncated to ``max_sequence_length``
  tokens (diffusers' defaults: 120 for alpha, 300 for Sigma; ``</s>`` kept last when truncated) with
  its attention mask, which also masks the padded tokens in the transformer's cross-attention.
  Prompts are used as given, i.e. diffusers' ``clean_caption=False`` (its default ``True`` rewrites
  captions with bs4 and ftfy, which diffjax does not do). No negative prompt means the empty one,
  tokenized, masked and encoded the same way; classifier-free guidance as for SD.
* ``PixArt`` predicts the scheduler's target (eps in the released folders) at the scheduler's
  timestep. A learned-variance transformer (out_channels = 2 x in_channels) also predicts the
  variance: only the first in_channels (the prediction) are used, as diffusers does.
* PixArt-alpha's 1024 px model (transformer ``sample_size`` 128, diffusers' rule, with the
  transformer's ``use_additional_conditions``) is also conditioned on the generated image's
  (height, width) in pixels and its aspect ratio height / width.
* The scheduler is the folder's (``DPMSolverMultistepScheduler`` in the released folders), read as
  it is (``schedulers.DiffusersScheduler``); the VAE decodes ``latents / scaling_factor``.
* Resolution binning (diffusers' ``use_resolution_binning``, on by default there): ``generate``
  generates at the aspect-ratio bin nearest to the requested size (``resolution_bin``; tables of
  256 / 512 / 1024 / 2048 px picked by the transformer's sample size 32 / 64 / 128 / 256, the last
  for Sigma only), then resizes and centre-crops the decoded images to the requested size
  (``resize_and_crop``). ``generate.generate`` (``pipelines.generate``) generates at the size asked,
  diffusers' ``use_resolution_binning=False``.

Conditioning pytree: ``(states (B, L, d_model), mask (B, L) float32 1/0)``; token ids (B, L) int32 with
the tokenizer's attention mask (B, L), L = ``max_sequence_length``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from diffjax import watermark as wm
from diffjax.models.tokenizers import T5Tokenizer
from diffjax.pipelines import generate as host
from diffjax.pipelines import programs
from diffjax.pipelines import vae as vae_codec
from diffjax.pipelines.core import Pipeline
from diffjax.pipelines.schedulers import DiffusersScheduler
from diffjax.pipelines.stable_diffusion import check_folder, load_models, load_scheduler

PARTS = ("transformer", "vae", "text_encoder")
ALPHA, SIGMA = "PixArtAlphaPipeline", "PixArtSigmaPipeline"
T5_LENGTHS = {ALPHA: 120, SIGMA: 300}  # diffusers' max_sequence_length defaults

# PixArt's aspect-ratio bins as (height, width) in sixteenths of the table's size (64 px in the 1024 px table);
# the 2048 px table (Sigma's 4K model) has seven more near the extreme aspect ratios 1 / 4 and 4.
_BINS = ((8, 32), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22), (11, 21), (12, 21),
         (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16), (16, 15), (17, 15), (17, 14),
         (18, 14), (18, 13), (19, 13), (20, 12), (21, 12), (22, 11), (23, 11), (24, 10), (25, 10), (27, 9), (32, 8))
_BINS_2048 = ((8, 31), (8, 30), (26, 9), (28, 9), (29, 8), (30, 8), (31, 8))
# transformer sample_size -> the table's size in pixels, per pipeline class (alpha has no 2048 px table)
BIN_TABLES = {ALPHA: {32: 256, 64: 512, 128: 1024}, SIGMA: {32: 256, 64: 512, 128: 1024, 256: 2048}}


@functools.lru_cache(maxsize=8)
def aspect_ratio_bins(size: int) -> tuple[tuple[float, tuple[int, int]], ...]:
  """PixArt's bins for ``size`` px (256, 512, 1024 or 2048): ((ratio, (height, width)), ...), ratio ascending.

  ``ratio`` is height / width rounded to two decimals, the key a requested size is matched against
  (diffusers' ``ASPECT_RATIO_*_BIN`` tables, whose keys are these ratios as strings).
  """
  if size not in (256, 512, 1024, 2048):
    raise ValueError(f"PixArt has bin tables for 256, 512, 1024 and 2048 px, not {size}")
  units = _BINS + (_BINS_2048 if size == 2048 else ())
  step = size // 16
  return tuple(sorted((round(h / w, 2), (h * step, w * step)) for h, w in units))


def resolution_bin(bins, height: int, width: int) -> tuple[int, int]:
  """(height, width) of the bin whose ratio is nearest to height / width (the first of equally near ones,
  by ascending ratio, as diffusers' ``classify_height_width_bin``); ``bins`` from ``aspect_ratio_bins``."""
  if height <= 0 or width <= 0:
    raise ValueError(f"height and width must be positive, got {height} x {width}")
  ratio = height / width
  return min(bins, key=lambda b: abs(b[0] - ratio))[1]


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower index, upper index, upper weight float32) per output sample of a linear resize from n_in to n_out
  samples: half-pixel centres, source positions clamped at the edges, no antialiasing (torch's ``interpolate``
  with ``mode='bilinear', align_corners=False``). Positions are float32 as torch's CPU kernel computes them: the
  float32 scale n_in / n_out times (i + 0.5), minus 0.5, rounded once (a fused multiply-add)."""
  scale = float(np.float32(n_in / n_out))
  src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  return lo, np.minimum(lo + 1, n_in - 1), src - lo.astype(np.float32)


def resize_and_crop(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """images (B, H, W, C) -> (B, height, width, C): scaled bilinearly (``_linear_taps``) by the larger of
  height / H and width / W so that they cover height x width, then centre-cropped (the top / left margin is
  the floor of half the excess). As diffusers' ``resize_and_crop_tensor``, except where its float truncation
  makes the scaled side a pixel shorter than the side asked for (its crop then returns a sliver): here the
  scaled side is never shorter."""
  b, h, w, c = images.shape
  if (h, w) == (height, width):
    return images
  scale = max(height / h, width / w)
  rh, rw = max(int(h * scale), height), max(int(w * scale), width)
  x = images.astype(np.float32)
  lo, hi, f = _linear_taps(h, rh)
  f = f[None, :, None, None]
  x = x[:, lo] * (1 - f) + x[:, hi] * f
  lo, hi, f = _linear_taps(w, rw)
  f = f[None, None, :, None]
  x = x[:, :, lo] * (1 - f) + x[:, :, hi] * f
  top, left = (rh - height) // 2, (rw - width) // 2
  return x[:, top:top + height, left:left + width]


@dataclasses.dataclass(frozen=True, eq=False)
class PixArtPipeline(Pipeline):
  """A ``Pipeline`` that knows PixArt's resolution bins (``generate`` below).

  Attributes (besides ``Pipeline``'s):
    bins: ``aspect_ratio_bins`` of the transformer's sample size; None where diffusers has no table for it
      (binning is then refused).
    default_size: the default height and width in pixels: the transformer's sample size times the VAE's
      downsampling, as diffusers.
  """

  bins: tuple | None = None
  default_size: int = 1024


def pixart_from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                           max_sequence_length: int | None = None) -> tuple[PixArtPipeline, dict]:
  """(pipeline, params) of a ``PixArtAlphaPipeline`` or ``PixArtSigmaPipeline`` diffusers folder; params
  {"transformer", "vae", "text_encoder"}; ``max_sequence_length``: T5's tokens (None: diffusers' default for the
  folder's class, 120 for alpha, 300 for Sigma)."""
  folder = os.fspath(path)
  index = check_folder(folder)
  kind = index.get("_class_name")
  if kind not in T5_LENGTHS:
    raise NotImplementedError(f"{folder}: {kind} is not supported; diffjax loads {ALPHA} and {SIGMA} folders")
  length = T5_LENGTHS[kind] if max_sequence_length is None else max_sequence_length
  if length < 1:
    raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
  modules, params = load_models(folder, PARTS, dtype=dtype, param_dtype=param_dtype)
  tokenizer = T5Tokenizer.from_folder(os.path.join(folder, "tokenizer"), length)
  scheduler = load_scheduler(os.path.join(folder, "scheduler"), sd_rewrite=False)  # read as it is, as diffusers
  return assemble_pixart(modules, tokenizer, scheduler, kind=kind, where=folder), params


def assemble_pixart(modules: dict, tokenizer: T5Tokenizer, scheduler: DiffusersScheduler, *, kind: str,
                    where: str) -> PixArtPipeline:
  """The ``PixArtPipeline`` of loaded modules {"transformer", "vae", "text_encoder"}; ``kind``: the pipeline class
  (``ALPHA`` or ``SIGMA``), ``where`` names the source in errors."""
  net, vae, t5 = (modules[k] for k in PARTS)
  c = net.config
  if c.in_channels != vae.config.latent_channels:
    raise ValueError(f"{where}: the transformer takes {c.in_channels} channels, the VAE's latents have "
                     f"{vae.config.latent_channels}")
  if c.outputs not in (c.in_channels, 2 * c.in_channels):
    raise ValueError(f"{where}: the transformer gives {c.outputs} channels; PixArt's pipelines take "
                     f"{c.in_channels} (the prediction) or {2 * c.in_channels} (with a learned variance)")
  if t5.config.d_model != c.caption_channels:
    raise ValueError(f"{where}: T5's width {t5.config.d_model} is not the transformer's caption_channels "
                     f"{c.caption_channels}")
  if vae.config.shift_factor:
    raise NotImplementedError(f"{where}: PixArt's pipelines decode latents / scaling_factor; a VAE with a "
                              f"shift_factor ({vae.config.shift_factor}) is not supported")
  # diffusers passes the image size only to alpha's 1024 px transformer (sample_size 128); one that needs it
  # elsewhere would fail there.
  sized = c.size_conditioned
  if sized and not (kind == ALPHA and c.sample_size == 128):
    raise ValueError(f"{where}: the transformer is conditioned on the image size, which {kind} passes only to "
                     f"PixArt-alpha's transformer of sample_size 128 (this one: {c.sample_size})")
  if vae.dtype != jnp.float32:
    vae = vae.clone(dtype=jnp.float32)
  f = vae.config.downsample_factor
  length = tokenizer.max_length

  def tokenize(prompts):
    t = tokenizer(prompts)
    return np.asarray(t.input_ids, np.int32), np.asarray(t.attention_mask, np.int32)

  def encode_text(params, ids, mask):
    """ids, mask (B, L) -> (T5 states (B, L, d_model), mask (B, L) float32)."""
    states = t5.apply({"params": params["text_encoder"]}, ids, mask).last_hidden_state
    return states, mask.astype(jnp.float32)

  def predict(params, x, t, cond):
    """x (B, h, w, c), t (B,) timesteps -> the prediction (B, h, w, c) (a learned variance dropped)."""
    states, mask = cond
    sizes = {}
    if sized:  # the generated image's (height, width) in pixels and height / width
      b, h, w, _ = x.shape
      sizes = dict(resolution=jnp.broadcast_to(jnp.asarray([h * f, w * f], jnp.float32), (b, 2)),
                   aspect_ratio=jnp.full((b, 1), h / w, jnp.float32))
    out = net.apply({"params": params["transformer"]}, x, t, states, mask, **sizes)
    return out[..., :c.in_channels].astype(jnp.float32)

  bins = BIN_TABLES[kind].get(c.sample_size)
  return PixArtPipeline(tokenize=tokenize, encode_text=encode_text, predict=predict, process=scheduler.process,
                        target=scheduler.target, latent_channels=vae.config.latent_channels, downsample=f,
                        time_scale=scheduler.time_scale,
                        decode=lambda p, x0: vae_codec.decode(vae, p["vae"], x0),
                        encode_image=lambda p, images, noise: vae_codec.encode(vae, p["vae"], images, noise),
                        scheduler=scheduler, max_length=length,
                        count_tokens=lambda p: len(tokenizer.encode(p)) + 1,
                        fingerprint=programs.fingerprint("pixart", kind, net, vae, t5, scheduler, length, sized),
                        bins=None if bins is None else aspect_ratio_bins(bins), default_size=c.sample_size * f)


@functools.lru_cache(maxsize=8)
def _without_decoder(pipe: PixArtPipeline) -> PixArtPipeline:
  """``pipe`` that returns latents (its sampling programs are ``pipe``'s: the fingerprint is shared)."""
  return dataclasses.replace(pipe, decode=None)


@functools.lru_cache(maxsize=8)
def _decoder(pipe: PixArtPipeline):
  return programs.program(pipe, pipe.decode, "decode")


def generate(pipe: PixArtPipeline, params, prompts: str | Sequence[str], *, height: int | None = None,
             width: int | None = None, use_resolution_binning: bool = True, watermark: wm.Watermark = wm.DEFAULT,
             **kwargs) -> host.Output:
  """txt2img as diffusers' PixArt pipelines run it, resolution binning included.

  Args:
    height, width: the size of the images returned, in pixels (None: ``pipe.default_size``).
    use_resolution_binning: generate at ``resolution_bin(pipe.bins, height, width)``, decode, then
      ``resize_and_crop`` to height x width (the pixel mark goes on the final images); a given ``noise``
      then has the bin's latent shape (B, bin height / f, bin width / f, c). False: ``generate.generate``
      at height x width.
    watermark, kwargs: as ``generate.generate`` (not ``image``: PixArt's pipelines are txt2img only).

  Returns:
    ``generate.Output``: images (B, height, width, 3) in [0, 1]; latents at the bin's size; the record
    also has ``resolution_bin`` [height, width] when binning.
  """
  height = pipe.default_size if height is None else height
  width = pipe.default_size if width is None else width
  if kwargs.get("image") is not None:
    raise ValueError("PixArt's pipelines are txt2img only: no init image")
  if not use_resolution_binning:
    return host.generate(pipe, params, prompts, height=height, width=width, watermark=watermark, **kwargs)
  if pipe.bins is None:
    raise ValueError("this PixArt's transformer sample size has no resolution bins (diffusers has tables for 32, "
                     "64, 128 and, for Sigma, 256): pass use_resolution_binning=False")
  bin_height, bin_width = resolution_bin(pipe.bins, height, width)
  out = host.generate(_without_decoder(pipe), params, prompts, height=bin_height, width=bin_width,
                      watermark=dataclasses.replace(watermark, pixel_bits=None), **kwargs)
  decoded = np.asarray(_decoder(pipe)(params, jnp.asarray(out.latents)), np.float32)  # (B, bin h, bin w, 3)
  images = np.clip(resize_and_crop(decoded, height, width) / 2.0 + 0.5, 0.0, 1.0)
  images, pixel_mark = watermark.mark_images(images)
  record = out.record | {"height": height, "width": width, "resolution_bin": [bin_height, bin_width],
                         "watermark": {"pixel": pixel_mark, "latent": out.record["watermark"]["latent"]}}
  return host.Output(images=images, latents=out.latents, record=record)
