"""A text-conditioned denoiser network: a text transformer feeding a U-Net's cross-attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.text import BertConfig, BertEncoder, CLIPTextConfig, CLIPTextTransformer
from diffjax.models.unet import UNet, UNetConfig

Array = jax.Array


class TextToImage(nn.Module):
  """U-Net conditioned on a text encoder (CLIP-style, or BERT for a pretrained one) through cross-attention.

  ``__call__(x (B,H,W,C), t (B,) network time, tokens (B,L) int, mask (B,L) int)``
  returns the U-Net's prediction (B,H,W,C). Unconditional predictions (for
  classifier-free guidance) use the tokens of the empty caption. The parameters are
  {"text_encoder", "denoiser"}; a frozen text encoder's can be kept out of training
  (``init(..., method=TextToImage.predict)`` creates the denoiser's alone).
  """

  unet: UNetConfig
  text: CLIPTextConfig | BertConfig
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_impl: str | None = None  # a diffjax.models.attention implementation name; None: 'auto'

  def setup(self):
    encoder = BertEncoder if isinstance(self.text, BertConfig) else CLIPTextTransformer
    self.text_encoder = encoder(self.text, remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype)
    self.denoiser = UNet(self.unet, remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype)

  def encode_text(self, tokens: Array, mask: Array) -> Array:
    """(B, L, text width) token states, the U-Net's cross-attention context."""
    return self.text_encoder(tokens, mask).last_hidden_state

  def predict(self, x: Array, t: Array, context: Array, *, deterministic: bool = True) -> Array:
    return self.denoiser(x, t, context, deterministic=deterministic).astype(jnp.float32)

  def __call__(self, x: Array, t: Array, tokens: Array, mask: Array, *, deterministic: bool = True) -> Array:
    return self.predict(x, t, self.encode_text(tokens, mask), deterministic=deterministic)
