"""A text-conditioned denoiser network: a text transformer feeding a U-Net's cross-attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.text import CLIPTextConfig, CLIPTextTransformer
from diffjax.models.unet import UNet, UNetConfig

Array = jax.Array


class TextToImage(nn.Module):
  """U-Net conditioned on a jointly trained CLIP-style text encoder.

  ``__call__(x (B,H,W,C), t (B,) network time, tokens (B,L) int, mask (B,L) int)``
  returns the U-Net's prediction (B,H,W,C). Unconditional predictions (for
  classifier-free guidance) use the tokens of the empty caption.
  """

  unet: UNetConfig
  text: CLIPTextConfig
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.text_encoder = CLIPTextTransformer(self.text, remat=self.remat, dtype=self.dtype)
    self.denoiser = UNet(self.unet, remat=self.remat, dtype=self.dtype)

  def encode_text(self, tokens: Array, mask: Array) -> Array:
    """(B, L, text width) token states, the U-Net's cross-attention context."""
    return self.text_encoder(tokens, mask).last_hidden_state

  def predict(self, x: Array, t: Array, context: Array, *, deterministic: bool = True) -> Array:
    return self.denoiser(x, t, context, deterministic=deterministic).astype(jnp.float32)

  def __call__(self, x: Array, t: Array, tokens: Array, mask: Array, *, deterministic: bool = True) -> Array:
    return self.predict(x, t, self.encode_text(tokens, mask), deterministic=deterministic)
