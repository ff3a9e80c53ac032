"""The T5 encoder (Raffel et al. 2020) as transformers' ``T5EncoderModel`` computes it: SD3's, Flux's and
PixArt's text encoder (T5 v1.1: gated GELU, untied head; the original T5's ReLU also works).

* Token embedding ``shared`` (no scaling, no absolute positions), then ``num_layers`` pre-norm blocks
  of self-attention and a feed-forward layer, then ``final_layer_norm``. Norms are RMS norms
  (``layers.RMSNorm``, eps ``layer_norm_epsilon``, statistics in float32); no dense layer has a bias.
* Attention logits are q . k, *not* divided by sqrt(d_kv). Positions enter only as a learned bias
  per head on the logits, indexed by a bucket of the key-minus-query offset (``position_buckets``);
  only block 0 owns the table (``relative_attention_bias``: (buckets, heads)), every block adds
  the same bias, plus the padding mask as T5 adds it: ``(1 - mask) * finfo(float32).min``.
* Feed-forward ``DenseReluDense``: gated, ``act(wi_0 x) * (wi_1 x) -> wo`` (``gated-gelu`` uses
  tanh GELU, transformers' ``gelu_new``); ungated ``act(wi x) -> wo``.

Parameter names mirror transformers' state dict (``encoder.block.N.layer.M...``), so weights load
by renaming (``diffjax.convert``). transformers clamps float16 activations to avoid overflow;
diffjax runs T5 in float32 or bfloat16 and has no float16 path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.attention import dot_product_attention
from diffjax.models.layers import Dtype, RMSNorm, dense, embed, split_heads
from diffjax.models.text import ACTIVATIONS, TextOutput, mean_pool

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5 encoder; the defaults are T5 v1.1 XXL (``google/t5-v1_1-xxl``, SD3's and Flux's)."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64  # per head; heads * d_kv need not equal d_model
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  act: str = 'gelu_new'  # a key of text.ACTIVATIONS
  gated: bool = True

  def __post_init__(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f'T5Config.act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}')


T5_CONFIGS: dict[str, T5Config] = {
    'tiny': T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
    't5_v1_1_xxl': T5Config(),
}


@functools.lru_cache(maxsize=32)
def position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(query_length, key_length) int32 bucket of each key-minus-query offset, bidirectional (the encoder's).

  Half the buckets are for positive offsets; within a half, offsets below num_buckets / 4 get their own
  bucket, larger ones share logarithmically spaced buckets up to ``max_distance`` (the last bucket takes
  everything beyond). Computed in NumPy float32 as transformers computes it in torch float32 (the truncation
  of log(n / exact) / log(max_distance / exact) * (half - exact) must round the same way), once per shape.
  """
  offset = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  bucket = (offset > 0).astype(np.int64) * half
  n = np.abs(offset)
  exact = half // 2
  # (n = 0 takes the exact branch; its logarithm is only kept finite)
  scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
  large = exact + (scaled * np.float32(half - exact)).astype(np.int64, copy=False).clip(max=half - exact - 1)
  bucket += np.where(n < exact, n, large)
  return bucket.astype(np.int32)


class T5Attention(nn.Module):
  """Unscaled multi-head self-attention of (B, L, d_model) with an additive logit bias.

  ``__call__(x, bias) -> (output, bias used)``. The attention that ``owns_position_bias`` (block 0's)
  adds the relative position bias (1, N, L, L) from its table to ``bias`` (the padding mask's) and
  returns the sum for the other blocks to reuse.
  """

  config: T5Config
  owns_position_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> tuple[Array, Array]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.owns_position_bias:
      length = x.shape[1]
      buckets = position_buckets(length, length, c.relative_attention_num_buckets,
                                 c.relative_attention_max_distance)
      table = embed(c.relative_attention_num_buckets, c.num_heads, name='relative_attention_bias', **kw)
      bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None].astype(jnp.float32) + bias
    inner = c.num_heads * c.d_kv
    q, k, v = (split_heads(dense(inner, name=n, use_bias=False, **kw)(x), c.num_heads) for n in ('q', 'k', 'v'))
    o = dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0, implementation='xla')
    return dense(c.d_model, name='o', use_bias=False, **kw)(o.reshape(*x.shape[:-1], inner)), bias


class _DenseActDense(nn.Module):  # transformers' T5DenseGatedActDense / T5DenseActDense
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    act = ACTIVATIONS[c.act]
    if c.gated:
      h = act(dense(c.d_ff, name='wi_0', **kw)(x)) * dense(c.d_ff, name='wi_1', **kw)(x)
    else:
      h = act(dense(c.d_ff, name='wi', **kw)(x))
    return dense(c.d_model, name='wo', **kw)(h)


class _SelfAttentionLayer(nn.Module):  # transformers' T5LayerSelfAttention: layer.0 of a block
  config: T5Config
  owns_position_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.config.layer_norm_epsilon, name='layer_norm', **kw)(x)
    h, bias = T5Attention(self.config, self.owns_position_bias, name='SelfAttention', **kw)(h, bias)
    return x + h, bias


class _FeedForwardLayer(nn.Module):  # transformers' T5LayerFF: layer.1 of a block
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.config.layer_norm_epsilon, name='layer_norm', **kw)(x)
    return x + _DenseActDense(self.config, name='DenseReluDense', **kw)(h)


class _Block(nn.Module):
  config: T5Config
  owns_position_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x, bias = _SelfAttentionLayer(self.config, self.owns_position_bias, name='layer_0', **kw)(x, bias)
    return _FeedForwardLayer(self.config, name='layer_1', **kw)(x), bias


class _Encoder(nn.Module):
  config: T5Config
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, output_hidden_states):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if attention_mask is None:
      bias = jnp.zeros((1, 1, 1, x.shape[1]), jnp.float32)
    else:  # as transformers masks: the most negative float32 added to a padded key's logits
      bias = (1.0 - attention_mask[:, None, None, :].astype(jnp.float32)) * jnp.finfo(jnp.float32).min
    block = nn.remat(_Block) if self.remat else _Block
    hs = []
    for i in range(c.num_layers):
      hs.append(x)
      x, bias = block(c, i == 0, name=f'block_{i}', **kw)(x, bias)
    x = RMSNorm(c.layer_norm_epsilon, name='final_layer_norm', **kw)(x)
    return x, (tuple(hs) + (x,) if output_hidden_states else None)


class T5EncoderModel(nn.Module):
  """T5 encoder: ``__call__(input_ids (B, L) int, attention_mask (B, L) 1/0 or None)`` -> ``TextOutput``.

  last_hidden_state (B, L, d_model) after ``final_layer_norm`` (what SD3, Flux and PixArt attend to);
  T5 has no pooled output: ``pooled`` is the masked mean over tokens (sentence-T5's pooling);
  hidden_states (with ``output_hidden_states``): as transformers returns them, the embeddings, the
  outputs of blocks 0 .. L - 2 and the final normed state (the last block's raw output is not among them).
  """

  config: T5Config
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
               output_hidden_states: bool = False) -> TextOutput:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = embed(c.vocab_size, c.d_model, name='shared', **kw)(input_ids)
    x, hs = _Encoder(c, self.remat, name='encoder', **kw)(x, attention_mask, output_hidden_states)
    return TextOutput(x, mean_pool(x, attention_mask), hs)
