"""A ``Pipeline`` around diffjax's own ``TextToImage`` network (what the trainer trains).

Parameters are ``{"model": TextToImage params (text encoder and U-Net), "vae": VAE params}`` (no
"vae" in pixel space). ``predict`` takes a ControlNet's residuals, so ``controlnet.with_controlnets``
steers these pipelines as it steers Stable Diffusion's (a ControlNet that ``diffjax.train.finetune``
trained beside the network). Turning a training workdir into these parameters is the trainer's job
(``diffjax.train.trainer.load_pipeline``: it knows checkpoints).
"""

from __future__ import annotations

import numpy as np

from diffjax.models.text_to_image import TextToImage
from diffjax.models.vae import AutoencoderKL
from diffjax.pipelines import vae as vae_codec
from diffjax.pipelines.core import Pipeline
from diffjax.processes import Process


def from_model(model: TextToImage, *, process: Process, target: str, tokenizer,
               image_shape: tuple, time_scale: float = 1.0, vae: AutoencoderKL | None = None) -> Pipeline:
  """The pipeline of ``model`` trained on ``process`` to predict ``target``.

  Args:
    tokenizer: a diffjax tokenizer (``diffjax.models.tokenizers``): text -> ids with bos/eos, padded.
    image_shape: (h, w, c) of the denoised space (pixels, or latents with ``vae``).
    time_scale: the network sees ``time_scale * t``.
    vae: the frozen autoencoder of a latent model (None: pixel space).
  """

  def tokenize(prompts):
    t = tokenizer(list(prompts))
    return np.asarray(t.input_ids, np.int32), np.asarray(t.attention_mask, np.int32)

  def encode_text(params, ids, mask):
    return model.apply({"params": params["model"]}, ids, mask, method=model.encode_text)

  def predict(params, x, t, context, residuals=None):
    """``residuals``: a ControlNet's (down residuals, mid residual), added to the U-Net's skips and middle block."""
    down, mid = (None, None) if residuals is None else residuals
    return model.apply({"params": params["model"]}, x, t, context, down_residuals=down, mid_residual=mid,
                       method=model.predict)

  latent = {}
  if vae is not None:
    downsample = vae.config.downsample_factor
    latent = dict(decode=lambda p, x0: vae_codec.decode(vae, p["vae"], x0),
                  encode_image=lambda p, images, noise: vae_codec.encode(vae, p["vae"], images, noise))
    if image_shape[-1] != vae.config.latent_channels:
      raise ValueError(f"image_shape {image_shape} does not end in the VAE's {vae.config.latent_channels} channels")
  return Pipeline(tokenize=tokenize, encode_text=encode_text, predict=predict,
                  process=process, target=target,
                  latent_channels=image_shape[-1], downsample=downsample if vae is not None else 1,
                  time_scale=time_scale, max_length=tokenizer.max_length,
                  count_tokens=lambda p: len(tokenizer.encode(p)) + 2, **latent)
