"""The VAE as the pipeline sees it: scaled latents <-> images, for an ``AutoencoderKL`` of any origin.

Diffusion runs on x0 = scaling_factor * (z - shift_factor), z a sample of the posterior
q(z | image) (Stable Diffusion's convention; ``shift_factor`` is 0 for SD 1.x/2.x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax.models.vae import AutoencoderKL


def scaled_latents(vae: AutoencoderKL, mean, std, noise) -> jax.Array:
  """x0 = scaling_factor * (z - shift_factor), z = mean + std * noise (noise standard normal, mean's shape)."""
  c = vae.config
  return c.scaling_factor * (mean + std * noise - c.shift_factor)


def posterior(vae: AutoencoderKL, vae_params, images, features: bool = False) -> tuple[jax.Array, ...]:
  """Posterior (mean, std), each (B, h, w, c), of images (B, H, W, C) in [-1, 1]; with ``features`` also the
  encoder's mid-block features (B, h, w, last channels) of the same pass (REPA's targets, ``train/repa.py``)."""
  q, state = vae.apply({"params": vae_params}, images, method="encode", mutable=["intermediates"])
  return (q.mean, q.std, *state["intermediates"]["encoder"]["features"]) if features else (q.mean, q.std)


def encode(vae: AutoencoderKL, vae_params, images, noise) -> jax.Array:
  """Scaled latents (B, h, w, c) float32 of images (B, H, W, C) in [-1, 1]: a posterior sample drawn with ``noise``."""
  mean, std = posterior(vae, vae_params, images.astype(jnp.float32))
  return scaled_latents(vae, mean, std, noise).astype(jnp.float32)


def decode(vae: AutoencoderKL, vae_params, x0) -> jax.Array:
  """Images (B, H, W, C) float32 in about [-1, 1] of scaled latents (B, h, w, c)."""
  c = vae.config
  z = x0.astype(jnp.float32) / c.scaling_factor + c.shift_factor
  return vae.apply({"params": vae_params}, z, method="decode").astype(jnp.float32)
