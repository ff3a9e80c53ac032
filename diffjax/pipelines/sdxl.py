"""Stable Diffusion XL base (Podell et al. 2023) from a diffusers folder: a ``Pipeline`` and its parameters.

What diffusers' ``StableDiffusionXLPipeline`` (and its img2img sibling) computes, as one
``core.Pipeline`` that ``generate.generate`` runs for txt2img and img2img:

* Two CLIP text encoders see the same prompt, each through its own tokenizer (the release's
  ``tokenizer_2`` pads with ``!``); the context (B, L, D1 + D2) is both encoders' penultimate
  hidden states (``hidden_states[-2]``, before the final LayerNorm) concatenated on the last
  axis; the pooled embedding (B, P) is ``text_encoder_2``'s projected end-of-text state (a
  ``CLIPTextModelWithProjection``). Neither encoder gets an attention mask.
* The U-Net adds SDXL's "text_time" embedding of (pooled, time ids) to its timestep embedding.
  The 6 time ids are (original height, width, crop top, left, target height, width) in pixels
  (``time_ids``): here original = target = the output size and crop (0, 0), diffusers' defaults,
  so they are a function of the latent shape and ``predict`` derives them from it (static under
  ``jit``, the same for both CFG branches, as diffusers' default negative time ids are).
* No negative prompt with ``force_zeros_for_empty_prompt`` (model_index.json, default true):
  the negative context and pooled embedding are zeros (``Pipeline.default_negative``); with it
  false, or with a negative prompt, the negative prompt (or "") is encoded like the prompt.
* The VAE decodes and encodes in float32 (``force_upcast``); latents are ``scaling_factor * z``.
  The scheduler config is read as it is (SDXL's pipelines do not rewrite ``steps_offset``).

Conditioning pytree (``encode_text``'s output, what CFG batches): ``(context (B, L, D1 + D2),
pooled (B, P))``. Token ids: (B, 2, L), row 0 for ``tokenizer``, row 1 for ``tokenizer_2``.
Not supported: the refiner (``requires_aesthetics_score``, no ``text_encoder``), a second prompt
for ``text_encoder_2`` (``prompt_2``), VAE ``latents_mean`` / ``latents_std`` (refused on loading).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.convert import load_pretrained
from diffjax.models.tokenizers import CLIPTokenizer
from diffjax.pipelines import programs
from diffjax.pipelines import vae as vae_codec
from diffjax.pipelines.core import Pipeline
from diffjax.pipelines.schedulers import DiffusersScheduler
from diffjax.pipelines.stable_diffusion import check_folder, load_scheduler, load_tokenizer

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the parameter tree's keys
NUM_TIME_IDS = 6


def time_ids(height: int, width: int, crop_top_left: tuple[int, int] = (0, 0),
             original_size: tuple[int, int] | None = None) -> tuple[float, ...]:
  """SDXL's micro-conditioning: original (h, w) + crop top-left (y, x) + target (h, w), pixels.

  The target is the output size; ``original_size`` defaults to it (diffusers' defaults).
  """
  original = original_size or (height, width)
  return tuple(float(v) for v in (*original, *crop_top_left, height, width))


def sdxl_from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                         clip_skip: int | None = None) -> tuple[Pipeline, dict]:
  """(pipeline, params) of an SDXL base diffusers folder (what ``folders.from_pretrained`` returns for it).

  ``params`` is {"unet", "vae", "text_encoder", "text_encoder_2"}; ``dtype`` / ``param_dtype`` as in
  ``folders.from_pretrained``. ``clip_skip``: the context is ``hidden_states[-(clip_skip + 2)]``
  of both encoders (None: the penultimate); diffusers applies it to the prompt but not to a negative
  prompt, here both.
  """
  folder = os.fspath(path)
  index = check_folder(folder)
  if index.get("requires_aesthetics_score"):
    raise NotImplementedError(f"{folder}: the SDXL refiner (requires_aesthetics_score) is not supported")
  loaded = load_pretrained(folder, dtype=dtype, param_dtype=param_dtype)
  tokenizers = [load_tokenizer(os.path.join(folder, t)) for t in ("tokenizer", "tokenizer_2")]
  scheduler = load_scheduler(os.path.join(folder, "scheduler"), sd_rewrite=False)
  modules = {k: loaded[k][0] for k in PARTS}
  pipe = assemble_sdxl(modules, tokenizers, scheduler, where=folder, clip_skip=clip_skip,
                  zeros_for_empty=index.get("force_zeros_for_empty_prompt", True))
  return pipe, {k: loaded[k][1] for k in PARTS}


def _check(modules: dict, tokenizers, where: str) -> None:
  """What diffusers checks (``_get_add_time_ids``) and what the conditioning's shapes need, named by folder."""
  unet, text, text_2 = modules["unet"].config, modules["text_encoder"].config, modules["text_encoder_2"].config
  if text_2.projection_dim is None:
    raise ValueError(f"{where}: text_encoder_2 must be a CLIPTextModelWithProjection (SDXL pools its projection)")
  if unet.addition_time_embed_dim is None:
    raise ValueError(f"{where}: the U-Net has no text_time addition embedding (addition_embed_type), not SDXL's")
  expected = text_2.projection_dim + NUM_TIME_IDS * unet.addition_time_embed_dim
  if unet.addition_embed_dim != expected:
    raise ValueError(f"{where}: the U-Net's added embedding takes {unet.addition_embed_dim} features; the pooled "
                     f"text ({text_2.projection_dim}) and {NUM_TIME_IDS} time ids x {unet.addition_time_embed_dim} "
                     f"give {expected}")
  if unet.cross_attention_dim != text.hidden_size + text_2.hidden_size:
    raise ValueError(f"{where}: the U-Net's cross_attention_dim {unet.cross_attention_dim} is not the text "
                     f"encoders' {text.hidden_size} + {text_2.hidden_size}")
  if tokenizers[0].max_length != tokenizers[1].max_length:
    raise ValueError(f"{where}: tokenizer and tokenizer_2 have lengths {tokenizers[0].max_length} and "
                     f"{tokenizers[1].max_length}; their states are concatenated per token, so they must agree")


def assemble_sdxl(modules: dict, tokenizers: tuple[CLIPTokenizer, CLIPTokenizer] | list, scheduler: DiffusersScheduler,
             *, where: str, clip_skip: int | None = None, zeros_for_empty: bool = True) -> Pipeline:
  """The SDXL ``Pipeline`` of loaded modules {"unet", "vae", "text_encoder", "text_encoder_2"} and the two
  tokenizers; ``zeros_for_empty``: diffusers' ``force_zeros_for_empty_prompt``; ``where`` names the source in
  errors. Params are {"unet", "vae", "text_encoder", "text_encoder_2"}."""
  _check(modules, tokenizers, where)
  unet, vae, text, text_2 = (modules[k] for k in PARTS)
  if vae.dtype != jnp.float32:  # force_upcast: SDXL's VAE overflows in half precision
    vae = vae.clone(dtype=jnp.float32)
  layer = -(2 + (clip_skip or 0))
  f = vae.config.downsample_factor

  def tokenize(prompts):
    ids = np.stack([np.asarray(t(prompts).input_ids, np.int32) for t in tokenizers], axis=1)  # (B, 2, L)
    return ids, np.ones_like(ids)  # no attention masks, as SDXL's encoders run

  def encode_text(params, ids, mask):
    """ids (B, 2, L) -> (context (B, L, D1 + D2), pooled (B, P))."""
    h1 = text.apply({"params": params["text_encoder"]}, ids[:, 0], None, output_hidden_states=True)
    h2 = text_2.apply({"params": params["text_encoder_2"]}, ids[:, 1], None, output_hidden_states=True)
    return jnp.concatenate([h1.hidden_states[layer], h2.hidden_states[layer]], axis=-1), h2.pooled

  def predict(params, x, t, cond):
    context, pooled = cond
    ids = jnp.asarray([time_ids(x.shape[1] * f, x.shape[2] * f)], jnp.float32)  # (1, 6), both branches alike
    return unet.apply({"params": params["unet"]}, x, t, context, text_embeds=pooled, time_ids=ids).astype(jnp.float32)

  return Pipeline(tokenize=tokenize, encode_text=encode_text, predict=predict, process=scheduler.process,
                  target=scheduler.target, latent_channels=vae.config.latent_channels, downsample=f,
                  decode=lambda p, x0: vae_codec.decode(vae, p["vae"], x0),
                  encode_image=lambda p, images, noise: vae_codec.encode(vae, p["vae"], images, noise),
                  scheduler=scheduler, max_length=tokenizers[0].max_length,
                  count_tokens=lambda p: max(len(t.encode(p)) for t in tokenizers) + 2,
                  default_negative=(lambda cond: jax.tree.map(jnp.zeros_like, cond)) if zeros_for_empty else None,
                  fingerprint=programs.fingerprint("sdxl", unet, vae, text, text_2, scheduler, clip_skip,
                                                   zeros_for_empty))
