"""Stable Diffusion 3 / 3.5 (Esser et al. 2024) from a diffusers folder: a ``Pipeline`` and its parameters.

What diffusers' ``StableDiffusion3Pipeline`` computes, as one ``core.Pipeline`` that
``generate.generate`` runs for txt2img (tested against it; img2img runs through the same generic
path but is not compared with ``StableDiffusion3Img2ImgPipeline`` yet):

* Three text encoders see the same prompt: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``,
  77 tokens, no attention mask) give their penultimate hidden states, concatenated per token
  (768 + 1280) and zero-padded to T5's width, and their projected end-of-text states, concatenated
  into the pooled vector (B, 768 + 1280); T5 (``text_encoder_3``, 256 tokens by default, no mask)
  gives its last hidden state. The context is [CLIP tokens, T5 tokens] along the sequence
  (B, 77 + 256, 4096). A folder without ``text_encoder_3`` uses zeros for the T5 part, as diffusers.
* The negative prompt (or "") is encoded the same way; classifier-free guidance as for SD.
* ``MMDiT`` predicts the flow velocity at timestep sigma * 1000 (``time_scale``); the scheduler is
  ``FlowMatchEulerDiscreteScheduler`` (``schedulers``: Euler on the rectified flow, shifted sigmas).
* The VAE (16 latent channels) decodes ``latents / scaling_factor + shift_factor``.

Conditioning pytree: ``(context (B, 77 + T5 length, joint_attention_dim), pooled (B, P))``. Token ids:
(B, 77 + 77 + T5 length): CLIP-L's, CLIP-G's, T5's, split again in ``encode_text``.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from diffjax.models.tokenizers import T5Tokenizer
from diffjax.pipelines import programs
from diffjax.pipelines import vae as vae_codec
from diffjax.pipelines.core import Pipeline
from diffjax.pipelines.schedulers import FLOW_MATCH, DiffusersScheduler
from diffjax.pipelines.stable_diffusion import check_folder, load_models, load_scheduler, load_tokenizer, names

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")  # text_encoder_3 (T5) is optional
T5_LENGTH = 256  # diffusers' max_sequence_length default


def sd3_from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        max_sequence_length: int = T5_LENGTH) -> tuple[Pipeline, dict]:
  """(pipeline, params) of an SD3 / SD3.5 diffusers folder; params {"transformer", "vae", "text_encoder",
  "text_encoder_2" and, with T5, "text_encoder_3"}; ``max_sequence_length``: T5's tokens (diffusers' 256)."""
  folder = os.fspath(path)
  index = check_folder(folder)  # with every component an SD3 folder names
  with_t5 = names(index, "text_encoder_3")
  modules, params = load_models(folder, PARTS + (("text_encoder_3",) if with_t5 else ()), dtype=dtype,
                                param_dtype=param_dtype)
  clip_tokenizers = [load_tokenizer(os.path.join(folder, t)) for t in ("tokenizer", "tokenizer_2")]
  t5_tokenizer = T5Tokenizer.from_folder(os.path.join(folder, "tokenizer_3"), max_sequence_length) if with_t5 else None
  scheduler = load_scheduler(os.path.join(folder, "scheduler"), sd_rewrite=False)
  pipe = assemble_sd3(modules, clip_tokenizers, t5_tokenizer, scheduler, where=folder,
                      max_sequence_length=max_sequence_length)
  return pipe, params


def assemble_sd3(modules: dict, clip_tokenizers, t5_tokenizer: T5Tokenizer | None, scheduler: DiffusersScheduler, *,
                 where: str, max_sequence_length: int = T5_LENGTH) -> Pipeline:
  """The SD3 ``Pipeline`` of loaded modules {"transformer", "vae", "text_encoder", "text_encoder_2" and optionally
  "text_encoder_3"}; ``where`` names the source in errors."""
  net, vae, clip_l, clip_g = (modules[k] for k in PARTS)
  t5 = modules.get("text_encoder_3")
  c = net.config
  if scheduler.class_name != FLOW_MATCH:
    raise ValueError(f"{where}: SD3 samples with {FLOW_MATCH}, the folder names {scheduler.class_name}")
  if clip_l.config.projection_dim is None or clip_g.config.projection_dim is None:
    raise ValueError(f"{where}: SD3's CLIP encoders must be CLIPTextModelWithProjection (pooled projections)")
  clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
  pooled_width = clip_l.config.projection_dim + clip_g.config.projection_dim
  if pooled_width != c.pooled_projection_dim or clip_width > c.joint_attention_dim:
    raise ValueError(f"{where}: the CLIP encoders give {clip_width} token and {pooled_width} pooled features; the "
                     f"transformer takes {c.joint_attention_dim} and {c.pooled_projection_dim}")
  if t5 is not None and t5.config.d_model != c.joint_attention_dim:
    raise ValueError(f"{where}: T5's width {t5.config.d_model} is not the transformer's joint_attention_dim "
                     f"{c.joint_attention_dim}")
  if vae.dtype != jnp.float32:
    vae = vae.clone(dtype=jnp.float32)
  clip_length = clip_tokenizers[0].max_length
  if clip_tokenizers[1].max_length != clip_length:
    raise ValueError(f"{where}: tokenizer and tokenizer_2 have lengths {clip_length} and "
                     f"{clip_tokenizers[1].max_length}; their states are concatenated per token")
  t5_length = t5_tokenizer.max_length if t5_tokenizer is not None else max_sequence_length

  def tokenize(prompts):
    parts = [np.asarray(t(prompts).input_ids, np.int32) for t in clip_tokenizers]
    if t5_tokenizer is not None:
      parts.append(np.asarray(t5_tokenizer(prompts).input_ids, np.int32))
    ids = np.concatenate(parts, axis=1)
    return ids, np.ones_like(ids)  # no attention masks: SD3 runs its encoders without them

  def encode_text(params, ids, mask):
    """ids (B, 2 * 77 [+ T5 length]) -> (context (B, 77 + T5 length, joint width), pooled (B, P))."""
    first, second = ids[:, :clip_length], ids[:, clip_length:2 * clip_length]
    h_l = clip_l.apply({"params": params["text_encoder"]}, first, None, output_hidden_states=True)
    h_g = clip_g.apply({"params": params["text_encoder_2"]}, second, None, output_hidden_states=True)
    clip_states = jnp.concatenate([h_l.hidden_states[-2], h_g.hidden_states[-2]], axis=-1)
    clip_states = jnp.pad(clip_states, ((0, 0), (0, 0), (0, c.joint_attention_dim - clip_width)))
    if t5 is not None:
      t5_states = t5.apply({"params": params["text_encoder_3"]}, ids[:, 2 * clip_length:], None).last_hidden_state
    else:
      t5_states = jnp.zeros((ids.shape[0], t5_length, c.joint_attention_dim), clip_states.dtype)
    context = jnp.concatenate([clip_states, t5_states.astype(clip_states.dtype)], axis=1)
    return context, jnp.concatenate([h_l.pooled, h_g.pooled], axis=-1)

  def predict(params, x, t, cond):
    context, pooled = cond
    return net.apply({"params": params["transformer"]}, x, t, context, pooled).astype(jnp.float32)

  def count_tokens(prompt):
    counts = [len(t.encode(prompt)) + 2 for t in clip_tokenizers]
    return max(counts)  # the CLIP limit is the one the prompt meets first (T5's is 256 and is logged apart)

  return Pipeline(tokenize=tokenize, encode_text=encode_text, predict=predict, process=scheduler.process,
                  target=scheduler.target, latent_channels=vae.config.latent_channels,
                  downsample=vae.config.downsample_factor,
                  time_scale=scheduler.time_scale,
                  decode=lambda p, x0: vae_codec.decode(vae, p["vae"], x0),
                  encode_image=lambda p, images, noise: vae_codec.encode(vae, p["vae"], images, noise),
                  scheduler=scheduler, max_length=clip_length, count_tokens=count_tokens,
                  fingerprint=programs.fingerprint("sd3", net, vae, clip_l, clip_g, t5, scheduler, clip_length,
                                                   t5_length))
