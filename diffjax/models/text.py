"""Text encoders: the CLIP text transformer (Radford et al. 2021) and BERT (Devlin et al. 2019).

Both take int token ids (B, L) and return a ``TextOutput`` of float hidden states
(B, L, D) and a pooled vector (B, D). Parameter names mirror transformers'
``CLIPTextModel`` (without ``text_model.``) and ``BertModel`` so weights convert by
renaming (``diffjax.convert``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from diffjax.models.attention import dot_product_attention
from diffjax.models.layers import Dtype, dense, embed, layer_norm, split_heads

Array = jax.Array

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}


@struct.dataclass
class TextOutput:
  """last_hidden_state (B, L, D); pooled (B, D) (or (B, projection_dim) with a projection);
  hidden_states: the embeddings and every layer's output (num_layers + 1 arrays) if requested."""

  last_hidden_state: Array
  pooled: Array
  hidden_states: tuple[Array, ...] | None = None


def mean_pool(hidden: Array, attention_mask: Array | None = None) -> Array:
  """Masked mean over tokens (sentence-transformers pooling): (B, L, D), (B, L) -> (B, D)."""
  if attention_mask is None:
    return hidden.mean(axis=1)
  m = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) over the last axis."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _padding_mask(attention_mask: Array | None) -> Array | None:
  """(B, S) 1/0 key mask -> boolean (B, 1, 1, S) for ``dot_product_attention``."""
  return None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]


# -- CLIP --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """CLIP text transformer. ``eos_token_id == 2`` means the legacy rule: pool at argmax(input_ids)."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_positions: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  projection_dim: int | None = None  # CLIPTextModelWithProjection


CLIP_TEXT_CONFIGS: dict[str, CLIPTextConfig] = {
    'tiny': CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
    'sd15': CLIPTextConfig(),  # openai/clip-vit-large-patch14 text tower
    'sd21': CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act='gelu'),
}


class _CLIPAttention(nn.Module):
  heads: int
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True  # the text tower's; CLIP's image tower attends both ways

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    q, k, v = (split_heads(dense(d, name=n, **kw)(x), self.heads) for n in ('q_proj', 'k_proj', 'v_proj'))
    o = dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.implementation)
    return dense(d, name='out_proj', **kw)(o.reshape(x.shape))


class _CLIPLayer(nn.Module):
  config: Any  # CLIPTextConfig or models.clip.CLIPVisionConfig (the fields the layer reads are common)
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(c.layer_norm_eps, name='layer_norm1', **kw)(x)
    x = x + _CLIPAttention(c.num_heads, self.implementation, name='self_attn', causal=self.causal, **kw)(h, mask)
    h = layer_norm(c.layer_norm_eps, name='layer_norm2', **kw)(x)
    h = _MLP(c.intermediate_size, c.hidden_act, name='mlp', **kw)(h)
    return x + h


class _MLP(nn.Module):
  features: int
  act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ACTIVATIONS[self.act](dense(self.features, name='fc1', **kw)(x))
    return dense(x.shape[-1], name='fc2', **kw)(h)


class _Stack(nn.Module):
  """``num`` layers named ``<prefix>_i``; returns the output and every intermediate."""

  layer: type
  num: int
  prefix: str
  kwargs: dict
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask):
    cls = nn.remat(self.layer) if self.remat else self.layer
    hs = [x]
    for i in range(self.num):
      x = cls(name=f'{self.prefix}_{i}', **self.kwargs)(x, mask)
      hs.append(x)
    return x, tuple(hs)


class CLIPTextTransformer(nn.Module):
  """CLIP text encoder: causal pre-LN transformer with learned positions and a final LayerNorm.

  ``__call__(input_ids (B, L) int, attention_mask (B, L) or None)`` -> ``TextOutput``:
  last_hidden_state (B, L, hidden) after ``final_layer_norm`` (the Stable Diffusion
  context), pooled = the state at the end-of-text token (argmax of ids when
  ``eos_token_id == 2``, else the first ``eos_token_id``), projected by
  ``text_projection`` when ``projection_dim`` is set. L <= max_positions.
  """

  config: CLIPTextConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
               output_hidden_states: bool = False) -> TextOutput:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _CLIPEmbeddings(c, name='embeddings', **kw)(input_ids)
    layer_kw = dict(config=c, implementation=self.attention_impl, **kw)
    x, hs = _Stack(_CLIPLayer, c.num_layers, 'layers', layer_kw, self.remat, name='encoder')(
        x, _padding_mask(attention_mask))
    x = layer_norm(c.layer_norm_eps, name='final_layer_norm', **kw)(x)
    if c.eos_token_id == 2:
      idx = jnp.argmax(input_ids, axis=-1)
    else:
      idx = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    if c.projection_dim is not None:
      pooled = dense(c.projection_dim, use_bias=False, name='text_projection', **kw)(pooled)
    return TextOutput(x, pooled, hs if output_hidden_states else None)


class _CLIPEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tok = embed(c.vocab_size, c.hidden_size, name='token_embedding', **kw)(input_ids)
    pos = embed(c.max_positions, c.hidden_size, name='position_embedding', **kw)(jnp.arange(input_ids.shape[1]))
    return tok + pos[None]


# -- BERT --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT encoder (post-LN). ``add_pooler``: the tanh dense layer on [CLS] (else pooled = masked mean)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_positions: int = 512
  type_vocab_size: int = 2
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-12
  add_pooler: bool = True


BERT_CONFIGS: dict[str, BertConfig] = {
    'tiny': BertConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
    # sentence-transformers/all-MiniLM-L6-v2 (use mean_pool + l2_normalize for sentence embeddings)
    'minilm-l6': BertConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=12),
}


class _BertLayer(nn.Module):
  config: BertConfig
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    # parameter tree: attention/{self/{query,key,value}, output/{dense,LayerNorm}}, intermediate/dense, output/...
    a = _BertSelfAttention(c.num_heads, c.layer_norm_eps, self.implementation, name='attention', **kw)(x, mask)
    h = _DenseLN(c.intermediate_size, None, c.hidden_act, name='intermediate', **kw)(a)
    return _DenseLN(d, c.layer_norm_eps, None, name='output', **kw)(h, a)


class _DenseLN(nn.Module):
  """``dense`` then either an activation or (residual + LayerNorm): BERT's intermediate/output sublayers."""

  features: int
  eps: float | None
  act: str | None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, residual=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.features, name='dense', **kw)(x)
    if self.act is not None:
      return ACTIVATIONS[self.act](h)
    return layer_norm(self.eps, name='LayerNorm', **kw)(h + residual)


class _QKV(nn.Module):
  heads: int
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    q, k, v = (split_heads(dense(d, name=n, **kw)(x), self.heads) for n in ('query', 'key', 'value'))
    return dot_product_attention(q, k, v, mask=mask, implementation=self.implementation).reshape(x.shape)


class _BertSelfAttention(nn.Module):
  heads: int
  eps: float
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _QKV(self.heads, self.implementation, name='self', **kw)(x, mask)
    return _DenseLN(x.shape[-1], self.eps, None, name='output', **kw)(h, x)


class BertEncoder(nn.Module):
  """BERT: word + position + token-type embeddings, LayerNorm, post-LN transformer layers.

  ``__call__(input_ids (B, L), attention_mask (B, L) 1 = token / 0 = padding, token_type_ids (B, L))``
  -> ``TextOutput``: last_hidden_state (B, L, hidden); pooled = tanh(dense([CLS])) with
  ``add_pooler``, else the masked mean of the hidden states (``mean_pool``).
  Dropout is not applied (inference / frozen-encoder use).
  """

  config: BertConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None, token_type_ids: Array | None = None, *,
               output_hidden_states: bool = False) -> TextOutput:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = _BertEmbeddings(c, name='embeddings', **kw)(input_ids, token_type_ids)
    layer_kw = dict(config=c, implementation=self.attention_impl, **kw)
    x, hs = _Stack(_BertLayer, c.num_layers, 'layer', layer_kw, self.remat, name='encoder')(
        x, _padding_mask(attention_mask))
    if c.add_pooler:
      pooled = _Pooler(name='pooler', **kw)(x[:, 0])
    else:
      pooled = mean_pool(x, attention_mask)
    return TextOutput(x, pooled, hs if output_hidden_states else None)


class _Pooler(nn.Module):
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(dense(x.shape[-1], name='dense', dtype=self.dtype, param_dtype=self.param_dtype)(x))


class _BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = embed(c.vocab_size, c.hidden_size, name='word_embeddings', **kw)(input_ids)
    x = x + embed(c.max_positions, c.hidden_size, name='position_embeddings', **kw)(
        jnp.arange(input_ids.shape[1]))[None]
    x = x + embed(c.type_vocab_size, c.hidden_size, name='token_type_embeddings', **kw)(token_type_ids)
    return layer_norm(c.layer_norm_eps, name='LayerNorm', **kw)(x)
