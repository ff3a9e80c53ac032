"""FLUX.1 (Black Forest Labs 2024) from a diffusers folder: a ``Pipeline`` and its parameters.

What diffusers' ``FluxPipeline`` computes, as one ``core.Pipeline`` that ``generate.generate`` runs:

* CLIP-L (``CLIPTextModel``, 77 tokens) gives only its pooled end-of-text state; T5
  (``text_encoder_2``, 512 tokens by default, no mask) gives the token states the transformer
  attends to (text position ids all zero).
* Latents are NHWC (B, H/8, W/8, 16) here; ``predict`` packs them into 2 x 2 patch tokens (and
  unpacks the velocity), with the rotary ids (0, row, col) of the token grid, as diffusers packs its
  latents. The network sees sigma (timestep / 1000) and multiplies it by 1000 itself.
* Guidance-distilled models (``guidance_embeds``, FLUX.1 [dev]) take the guidance scale as an input
  (``Pipeline.embedded_guidance``): one network call per step and no negative prompt; FLUX.1
  [schnell] takes neither. The scheduler is the flow-matching Euler with a shift that follows the
  image's token count (``generate.plan_for(..., height=, width=)``).
* The VAE (16 latent channels) decodes ``latents / scaling_factor + shift_factor``.

Conditioning pytree: ``(t5_states (B, L, 4096), pooled (B, 768))``; token ids (B, 77 + L): CLIP's, T5's.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from diffjax.models.flux import image_ids, pack_latents, rotary_for, unpack_latents
from diffjax.models.tokenizers import T5Tokenizer
from diffjax.pipelines import programs
from diffjax.pipelines import vae as vae_codec
from diffjax.pipelines.core import Pipeline
from diffjax.pipelines.schedulers import FLOW_MATCH, DiffusersScheduler
from diffjax.pipelines.stable_diffusion import check_folder, load_models, load_scheduler, load_tokenizer

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
T5_LENGTH = 512  # FluxPipeline's max_sequence_length default (schnell's folders use 256)


def flux_from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                         max_sequence_length: int = T5_LENGTH) -> tuple[Pipeline, dict]:
  """(pipeline, params) of a FLUX.1 diffusers folder; params {"transformer", "vae", "text_encoder",
  "text_encoder_2"}; ``max_sequence_length``: T5's tokens."""
  folder = os.fspath(path)
  check_folder(folder)
  modules, params = load_models(folder, PARTS, dtype=dtype, param_dtype=param_dtype)
  clip_tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
  t5_tokenizer = T5Tokenizer.from_folder(os.path.join(folder, "tokenizer_2"), max_sequence_length)
  scheduler = load_scheduler(os.path.join(folder, "scheduler"), sd_rewrite=False)
  return assemble_flux(modules, clip_tokenizer, t5_tokenizer, scheduler, where=folder), params


def assemble_flux(modules: dict, clip_tokenizer, t5_tokenizer: T5Tokenizer, scheduler: DiffusersScheduler, *,
                  where: str) -> Pipeline:
  """The Flux ``Pipeline`` of loaded modules {"transformer", "vae", "text_encoder", "text_encoder_2"}."""
  net, vae, clip, t5 = (modules[k] for k in PARTS)
  c = net.config
  if scheduler.class_name != FLOW_MATCH:
    raise ValueError(f"{where}: Flux samples with {FLOW_MATCH}, the folder names {scheduler.class_name}")
  if clip.config.hidden_size != c.pooled_projection_dim or t5.config.d_model != c.joint_attention_dim:
    raise ValueError(f"{where}: the encoders give {clip.config.hidden_size} pooled and {t5.config.d_model} token "
                     f"features; the transformer takes {c.pooled_projection_dim} and {c.joint_attention_dim}")
  if c.in_channels != 4 * vae.config.latent_channels:
    raise ValueError(f"{where}: the transformer takes {c.in_channels} channels, 2 x 2 patches of the VAE's "
                     f"{vae.config.latent_channels} give {4 * vae.config.latent_channels}")
  if vae.dtype != jnp.float32:
    vae = vae.clone(dtype=jnp.float32)
  clip_length, t5_length = clip_tokenizer.max_length, t5_tokenizer.max_length

  def tokenize(prompts):
    ids = np.concatenate([np.asarray(clip_tokenizer(prompts).input_ids, np.int32),
                          np.asarray(t5_tokenizer(prompts).input_ids, np.int32)], axis=1)
    return ids, np.ones_like(ids)  # no attention masks, as FluxPipeline runs its encoders

  def encode_text(params, ids, mask):
    pooled = clip.apply({"params": params["text_encoder"]}, ids[:, :clip_length], None).pooled
    states = t5.apply({"params": params["text_encoder_2"]}, ids[:, clip_length:], None).last_hidden_state
    return states, pooled

  def predict(params, x, t, cond):
    (states, pooled), scale = cond
    b, h, w, _ = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"Flux packs 2 x 2 latent patches: height and width must be multiples of "
                       f"{2 * vae.config.downsample_factor} pixels, the latents are {h} x {w}")
    rotary = rotary_for(c, image_ids(h // 2, w // 2), np.zeros((states.shape[1], 3), np.float32))
    guidance = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (b,)) if c.guidance_embeds else None
    sigma = jnp.asarray(t, jnp.float32) / jnp.float32(1000.0)  # FluxPipeline passes timestep / 1000
    out = net.apply({"params": params["transformer"]}, pack_latents(x), sigma, states, pooled, rotary, guidance)
    return unpack_latents(out, h, w).astype(jnp.float32)

  return Pipeline(tokenize=tokenize, encode_text=encode_text, predict=predict, process=scheduler.process,
                  target=scheduler.target, latent_channels=vae.config.latent_channels,
                  downsample=vae.config.downsample_factor, time_scale=scheduler.time_scale,
                  decode=lambda p, x0: vae_codec.decode(vae, p["vae"], x0),
                  encode_image=lambda p, images, noise: vae_codec.encode(vae, p["vae"], images, noise),
                  scheduler=scheduler, max_length=t5_length,
                  count_tokens=lambda p: len(t5_tokenizer.encode(p)) + 1,
                  default_negative=lambda cond: cond, embedded_guidance=True,
                  fingerprint=programs.fingerprint("flux", net, vae, clip, t5, scheduler, clip_length, t5_length))
