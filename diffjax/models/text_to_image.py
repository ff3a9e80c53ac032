"""A text-conditioned denoiser network: a text transformer feeding a U-Net's cross-attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.controlnet import ControlNet, ControlNetConfig
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

  def predict(self, x: Array, t: Array, context: Array, *, deterministic: bool = True,
              down_residuals: tuple | None = None, mid_residual: Array | None = None) -> Array:
    """The U-Net's prediction (B,H,W,C) float32; ``down_residuals`` / ``mid_residual``: a ControlNet's."""
    return self.denoiser(x, t, context, deterministic=deterministic, down_residuals=down_residuals,
                         mid_residual=mid_residual).astype(jnp.float32)

  def __call__(self, x: Array, t: Array, tokens: Array, mask: Array, *, deterministic: bool = True) -> Array:
    return self.predict(x, t, self.encode_text(tokens, mask), deterministic=deterministic)


class ControlledTextToImage(nn.Module):
  """A ``TextToImage`` steered by a ControlNet of its U-Net: parameters {"base", "controlnet"}.

  ``__call__(x, t, tokens, mask, *, control (B, f H, f W, 3) in [0, 1], f = the ControlNet's
  ``embedding_downsampling``)`` is the base's prediction with the ControlNet's residuals, times
  ``scale``, added to its skips and middle block (what ``diffjax.train.finetune`` trains, the
  base frozen).
  """

  base: TextToImage
  control_config: ControlNetConfig
  scale: float = 1.0

  def setup(self):
    self.controlnet = controlnet_of(self)

  def encode_text(self, tokens: Array, mask: Array) -> Array:
    return self.base.encode_text(tokens, mask)

  def predict(self, x: Array, t: Array, context: Array, control: Array, *, deterministic: bool = True) -> Array:
    down, mid = self.controlnet(x, t, context, control, self.scale, deterministic=deterministic)
    return self.base.predict(x, t, context, deterministic=deterministic, down_residuals=down, mid_residual=mid)

  def __call__(self, x: Array, t: Array, tokens: Array, mask: Array, *, control: Array,
               deterministic: bool = True) -> Array:
    return self.predict(x, t, self.encode_text(tokens, mask), control, deterministic=deterministic)


def controlnet_of(model: ControlledTextToImage) -> ControlNet:
  """The ControlNet of ``model`` alone (its parameters are the model's "controlnet" entry), e.g. to save it."""
  return ControlNet(model.control_config, remat=model.base.remat, attention_impl=model.base.attention_impl,
                    dtype=model.base.dtype)
