"""CLIP (Radford et al. 2021) with both towers, as transformers' ``CLIPModel`` computes it, for CLIP scores.

* Image tower (``CLIPVisionTransformer``): non-overlapping patches (a bias-free convolution of
  stride ``patch_size``), a learned class token in front, learned positions, ``pre_layrnorm``
  (transformers' spelling), the text tower's pre-LN layers without the causal mask, and
  ``post_layernorm`` of the class token's state: the pooled output (B, hidden).
* Text tower: ``text.CLIPTextTransformer`` (pooled at the end-of-text token).
* ``CLIPModel`` projects both pooled outputs without bias (``visual_projection``,
  ``text_projection``) to ``projection_dim``; ``logit_scale`` is the learned log temperature.

Images enter as ``pixel_values`` (B, H, W, 3): already resized, cropped and normalized with
CLIP's mean and std (``diffjax.evaluate.clip_score.preprocess`` does what transformers'
``CLIPImageProcessor`` does). Parameter names follow transformers' state dict, so
``diffjax.convert.keys`` maps them by name.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.layers import Dtype, dense, embed, layer_norm
from diffjax.models.text import CLIPTextConfig, CLIPTextTransformer, _CLIPLayer, _Stack


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_heads=8)
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512


class CLIPVisionTransformer(nn.Module):
  """pixel_values (B, image_size, image_size, 3) -> pooled (B, hidden) (module docstring)."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if pixel_values.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"CLIP's image tower takes (B, {c.image_size}, {c.image_size}, 3), got {pixel_values.shape}")
    x = _CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
    x = layer_norm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
    layer_kw = dict(config=c, causal=False, **kw)
    x, _ = _Stack(_CLIPLayer, c.num_layers, "layers", layer_kw, name="encoder")(x, None)
    return layer_norm(c.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


class _CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = c.patch_size
    patches = nn.Conv(c.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False, name="patch_embedding",
                      **kw)(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, c.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
    positions = embed(x.shape[1], c.hidden_size, name="position_embedding", **kw)(jnp.arange(x.shape[1]))
    return x + positions[None]


class CLIPModel(nn.Module):
  """Both towers and projections; ``encode_image`` / ``encode_text`` give the projected (unnormalized) embeddings."""

  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self.config
    self.text_model = CLIPTextTransformer(dataclasses.replace(c.text, projection_dim=None), **kw)
    self.vision_model = CLIPVisionTransformer(c.vision, **kw)
    self.text_projection = dense(c.projection_dim, use_bias=False, **kw)
    self.visual_projection = dense(c.projection_dim, use_bias=False, **kw)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

  def encode_image(self, pixel_values):
    """(B, H, W, 3) normalized pixels -> (B, projection_dim)."""
    return self.visual_projection(self.vision_model(pixel_values))

  def encode_text(self, input_ids, attention_mask=None):
    """(B, L) token ids -> (B, projection_dim)."""
    return self.text_projection(self.text_model(input_ids, attention_mask).pooled)

  def __call__(self, pixel_values, input_ids, attention_mask=None):
    """(image embeddings, text embeddings, logit scale): what a CLIP score needs, all towers initialized."""
    return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), self.logit_scale
