"""A text-conditioned denoiser network: a text transformer feeding a U-Net's cross-attention, or an MMDiT's
joint attention (with the text's pooled vector in its adaLN)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.controlnet import ControlNet, ControlNetConfig
from diffjax.models.mmdit import MMDiT, MMDiTConfig
from diffjax.models.text import BertConfig, BertEncoder, CLIPTextConfig, CLIPTextTransformer
from diffjax.models.unet import UNet, UNetConfig

Array = jax.Array


class TextToImage(nn.Module):
  """A denoiser conditioned on a text encoder (CLIP-style, or BERT for a pretrained one).

  ``backbone``: a ``UNetConfig`` (the text's token states reach the U-Net through cross-attention) or an
  ``MMDiTConfig`` (SD3's joint attention over [image patches, text tokens]; the text's pooled vector, the
  state at the end-of-text token or BERT's, conditions the adaLN beside the time).
  ``__call__(x (B,H,W,C), t (B,) network time, tokens (B,L) int, mask (B,L) int)``
  returns the denoiser's prediction (B,H,W,C). Unconditional predictions (for
  classifier-free guidance) use the tokens of the empty caption. The parameters are
  {"text_encoder", "denoiser"}; a frozen text encoder's can be kept out of training
  (``init(..., method=TextToImage.predict)`` creates the denoiser's alone).
  """

  backbone: UNetConfig | MMDiTConfig
  text: CLIPTextConfig | BertConfig
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_impl: str | None = None  # a diffjax.models.attention implementation name; None: 'auto'

  def setup(self):
    encoder = BertEncoder if isinstance(self.text, BertConfig) else CLIPTextTransformer
    self.text_encoder = encoder(self.text, remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype)
    network = MMDiT if self.is_transformer else UNet
    self.denoiser = network(self.backbone, remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype)

  @property
  def is_transformer(self) -> bool:
    return isinstance(self.backbone, MMDiTConfig)

  def encode_text(self, tokens: Array, mask: Array):
    """The denoiser's text conditioning: (B, L, text width) token states for a U-Net; for an MMDiT the pair
    (token states, pooled (B, text width))."""
    out = self.text_encoder(tokens, mask)
    return (out.last_hidden_state, out.pooled) if self.is_transformer else out.last_hidden_state

  def predict(self, x: Array, t: Array, context, *, deterministic: bool = True,
              down_residuals: tuple | None = None, mid_residual: Array | None = None) -> Array:
    """The denoiser's prediction (B,H,W,C) float32; ``context``: ``encode_text``'s; ``down_residuals`` /
    ``mid_residual``: a ControlNet's (U-Net only)."""
    if self.is_transformer:
      if down_residuals is not None or mid_residual is not None:
        raise ValueError("ControlNet residuals steer a U-Net; this TextToImage's backbone is an MMDiT")
      return self.denoiser(x, t, *context).astype(jnp.float32)
    return self.denoiser(x, t, context, deterministic=deterministic, down_residuals=down_residuals,
                         mid_residual=mid_residual).astype(jnp.float32)

  def dummy_context(self, batch: int, length: int):
    """Zeros shaped like ``encode_text``'s output for ``length`` tokens (to initialise the denoiser alone)."""
    states = jnp.zeros((batch, length, self.text.hidden_size))
    return (states, jnp.zeros((batch, pooled_width(self.text)))) if self.is_transformer else states

  def __call__(self, x: Array, t: Array, tokens: Array, mask: Array, *, deterministic: bool = True) -> Array:
    return self.predict(x, t, self.encode_text(tokens, mask), deterministic=deterministic)


def pooled_width(text: CLIPTextConfig | BertConfig) -> int:
  """Width of a text encoder's pooled vector: its projection's (CLIP with projection) or its hidden size."""
  return getattr(text, "projection_dim", None) or text.hidden_size


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
