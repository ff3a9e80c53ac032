"""Representation alignment (REPA; Yu et al. 2024, "Representation Alignment for Generation"): an auxiliary loss
that makes a transformer denoiser's hidden image tokens predictable, through a small trained projector, from a
frozen encoder's features of the clean image.

The total objective is ``denoising loss + weight * alignment``, with the alignment the negative cosine similarity
between ``Projector(h_layer)`` (the image tokens after block ``layer`` of the noisy input's forward pass) and the
target features, averaged over tokens. The encoder here is the latent model's own frozen VAE encoder (its
mid-block output at latent resolution, ``models.vae.Encoder``'s sown ``features``), average-pooled to the
denoiser's patch grid; REPA's paper uses DINOv2, which no package ships without a download. The projector's
parameters train with the denoiser (``params["repa_projector"]``) and never reach sampling
(``trainer.pipeline_params`` drops them).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

PARAMS = "repa_projector"  # the projector's entry in the trained parameters


class Projector(nn.Module):
  """(B, N, width) image tokens -> (B, N, features): a 3-layer MLP with SiLU, as REPA's projector."""

  hidden: int
  features: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    h = nn.silu(nn.Dense(self.hidden, name="fc1")(h))
    h = nn.silu(nn.Dense(self.hidden, name="fc2")(h))
    return nn.Dense(self.features, name="fc3")(h)


@dataclasses.dataclass(frozen=True)
class RepaSpec:
  """How the auxiliary loss is made (typed view of ``config.repa``).

  Attributes:
    weight: lambda of the alignment term (REPA: 0.5).
    layer: the image tokens after this block (1-based) are aligned (REPA: about a third of the depth).
    projector: the trained MLP (``Projector``).
    patch: the denoiser's patch size: the encoder's (B, h, w, C) features are averaged over each patch.
  """

  weight: float
  layer: int
  projector: Projector
  patch: int

  def targets(self, features: jax.Array) -> jax.Array:
    """(B, N, C) targets of the frozen encoder's (B, h, w, C) features of the clean images (no gradient)."""
    return pooled_tokens(jax.lax.stop_gradient(features), self.patch)


def pooled_tokens(features: jax.Array, patch: int) -> jax.Array:
  """(B, h, w, C) feature map -> (B, (h / patch) * (w / patch), C): each patch's mean, in the row-major token order
  of ``models.mmdit``'s patch embedding."""
  b, h, w, c = features.shape
  pooled = features.reshape(b, h // patch, patch, w // patch, patch, c).mean(axis=(2, 4))
  return pooled.reshape(b, (h // patch) * (w // patch), c)


def alignment(projected: jax.Array, targets: jax.Array) -> jax.Array:
  """(B,) negative cosine similarity of (B, N, D) projected tokens with (B, N, D) targets, averaged over tokens
  (-1: every token points where its target does)."""
  unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-6)
  return -jnp.mean(jnp.sum(unit(projected.astype(jnp.float32)) * unit(targets.astype(jnp.float32)), -1), -1)


def image_tokens(intermediates: dict, layer: int) -> jax.Array:
  """The (B, N, width) image tokens after block ``layer`` (1-based) sown by ``models.mmdit.MMDiT``."""
  return intermediates["denoiser"]["image_tokens"][layer - 1]
