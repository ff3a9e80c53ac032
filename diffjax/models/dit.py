"""DiT (Peebles & Xie 2023): a transformer on latent patches with adaLN-Zero, as diffusers'
``DiTTransformer2DModel`` computes it.

* ``pos_embed``: non-overlapping p x p patches (a strided convolution ``proj``) plus a fixed 2-D
  sin-cos position table (``sincos_position_table``; not a parameter: recomputed for the grid).
* Every block conditions on (timestep, class label) through its own ``norm1`` (``AdaLayerNormZero``):
  ``emb`` = timestep MLP of a 256-channel sinusoid (cos first, frequency shift 1) + a label table with
  one extra row for the null label (``num_classes``, classifier-free guidance), then ``linear`` of
  SiLU(emb) -> shift, scale, gate for the attention and for the MLP. Norms have no affine
  parameters; the gates start at zero in the paper's initialisation (here: whatever the weights say).
* Output: block 0's embedding gives the final shift and scale (``proj_out_1``), ``proj_out_2`` maps
  each token to p x p x out_channels, unpatchified.

Images are NHWC: ``__call__(x (B, H, W, C), t (B,) in the model's steps, class_labels (B,) int)`` ->
(B, H, W, out_channels) (DiT-XL/2 learns its variance: out_channels = 2 C, the first C the noise).
H and W must be multiples of the patch size; other sizes than ``sample_size`` get the position table
of their own grid, laid out as diffusers lays it (``base_size`` = sample_size / patch).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.layers import (
  FEED_FORWARD_ACTIVATIONS,
  Attention,
  Dtype,
  FeedForward,
  TimestepMLP,
  conv,
  dense,
  embed,
  timestep_embedding,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Sizes of a DiT; the defaults are DiT-XL/2 at 256 px (32 x 32 latents, 1000 ImageNet classes)."""

  num_heads: int = 16
  head_dim: int = 72
  in_channels: int = 4
  out_channels: int | None = 8  # None: in_channels
  num_layers: int = 28
  sample_size: int = 32  # latent side the position table's base is set for
  patch_size: int = 2
  num_classes: int = 1000  # the label table has one more row: the null label
  norm_eps: float = 1e-5  # the MLP's norm (the attention's and the output's use 1e-6, as diffusers)
  attention_bias: bool = True
  activation: str = 'gelu-approximate'

  def __post_init__(self):
    if self.activation not in FEED_FORWARD_ACTIVATIONS:
      raise ValueError(f'DiTConfig.activation must be one of {FEED_FORWARD_ACTIVATIONS}, got {self.activation!r}')

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def outputs(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels


DIT_CONFIGS: dict[str, DiTConfig] = {
    'tiny': DiTConfig(num_heads=2, head_dim=8, num_layers=2, sample_size=8, num_classes=10),
    'dit_xl_2_256': DiTConfig(),
    'dit_xl_2_512': DiTConfig(sample_size=64),
}


@functools.lru_cache(maxsize=32)
def sincos_position_table(width: int, rows: int, cols: int, base_size: int, interpolation_scale: float = 1.0
                          ) -> np.ndarray:
  """(rows * cols, width) float32 2-D sin-cos positions of a row-major token grid.

  Position r along an axis of n tokens is r / (n / base_size) / interpolation_scale (float32); the
  first width / 2 channels encode the column, the rest the row, each as [sin, cos] of the position
  times 10000^(-i / (width / 4)), i < width / 4, computed in float64 (diffusers'
  ``get_2d_sincos_pos_embed``).
  """
  if width % 4:
    raise ValueError(f'a 2-D sin-cos table needs a width divisible by 4, got {width}')
  axis = lambda n: (np.arange(n, dtype=np.float32) / np.float32(n / base_size)) / np.float32(interpolation_scale)
  omega = 1.0 / 10000.0 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))

  def one_axis(pos):  # (M,) -> (M, width / 2)
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  row, col = np.meshgrid(axis(rows), axis(cols), indexing='ij')
  return np.concatenate([one_axis(col.reshape(-1)), one_axis(row.reshape(-1))], axis=1).astype(np.float32)


def plain_norm(x: Array, eps: float) -> Array:
  """LayerNorm over the last axis without scale or bias, statistics in float32."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = x32.mean(-1, keepdims=True)
  centred = x32 - mean
  return (centred * jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)).astype(x.dtype)


def modulate(x: Array, shift: Array, scale: Array, eps: float = 1e-6) -> Array:
  """adaLN: ``plain_norm(x) * (1 + scale) + shift`` (shift and scale broadcast over the tokens)."""
  return plain_norm(x, eps) * (1 + scale) + shift


def unpatchify(tokens: Array, rows: int, cols: int, patch: int) -> Array:
  """(B, rows * cols, patch * patch * C) tokens -> (B, rows * patch, cols * patch, C) float32 NHWC, each
  token's channels in (row in patch, column in patch, C) order (diffusers' ``nhwpqc``)."""
  b, _, d = tokens.shape
  c = d // (patch * patch)
  h = tokens.reshape(b, rows, cols, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return h.reshape(b, rows * patch, cols * patch, c).astype(jnp.float32)


class Modulation(nn.Module):
  """A ``norm1``-style module: ``linear`` of SiLU(temb (B, D)) -> ``count`` (B, 1, D) modulations, in the
  checkpoint's order."""

  count: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: Array) -> list[Array]:
    out = dense(self.count * emb.shape[-1], name='linear', dtype=self.dtype, param_dtype=self.param_dtype)(
        nn.silu(emb))
    return [m[:, None] for m in jnp.split(out, self.count, axis=-1)]


class PatchEmbed(nn.Module):
  """(B, H, W, C) -> (B, H/p * W/p, width) row-major patch tokens (a strided convolution ``proj``) plus the
  sin-cos table of their grid (``sincos_position_table`` with ``base_size``, ``interpolation_scale``)."""

  width: int
  patch_size: int
  base_size: int
  interpolation_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    h = conv(self.width, p, stride=p, padding='VALID', name='proj', dtype=self.dtype,
             param_dtype=self.param_dtype)(x.astype(self.dtype))
    b, rows, cols, d = h.shape
    table = sincos_position_table(d, rows, cols, self.base_size, float(self.interpolation_scale))
    return (h.reshape(b, rows * cols, d) + jnp.asarray(table, h.dtype)[None]).astype(self.dtype)


class _LabelEmbedding(nn.Module):  # diffusers' LabelEmbedding: num_classes + 1 rows, the last the null label
  config: DiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels: Array) -> Array:
    c = self.config
    return embed(c.num_classes + 1, c.width, name='embedding_table', dtype=self.dtype,
                 param_dtype=self.param_dtype)(labels)


class _TimestepLabelEmbedding(nn.Module):  # diffusers' CombinedTimestepLabelEmbeddings
  config: DiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, labels: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoid = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1.0).astype(self.dtype)
    time = TimestepMLP(self.config.width, name='timestep_embedder', **kw)(sinusoid)
    return time + _LabelEmbedding(self.config, name='class_embedder', **kw)(labels)


class _AdaLayerNormZero(nn.Module):
  """(x, t, labels) -> (modulated norm of x, conditioning embedding, the five other modulations)."""

  config: DiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, labels: Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = _TimestepLabelEmbedding(self.config, name='emb', **kw)(t, labels)
    mods = dense(6 * self.config.width, name='linear', **kw)(nn.silu(emb))
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = (m[:, None] for m in jnp.split(mods, 6, axis=-1))
    return modulate(x, shift, scale), emb, (gate, shift_mlp, scale_mlp, gate_mlp)


class DiTBlock(nn.Module):
  """adaLN-Zero block: (x (B, N, D), t (B,), labels (B,)) -> (x, the block's conditioning embedding (B, D))."""

  config: DiTConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, labels: Array):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, emb, (gate, shift_mlp, scale_mlp, gate_mlp) = _AdaLayerNormZero(c, name='norm1', **kw)(x, t, labels)
    x = x + gate * Attention(c.num_heads, c.head_dim, qkv_bias=c.attention_bias, implementation=self.attention_impl,
                             name='attn1', **kw)(h)
    h = modulate(x, shift_mlp, scale_mlp, c.norm_eps)  # diffusers' norm3 (no affine parameters)
    return x + gate_mlp * FeedForward(activation=c.activation, name='ff', **kw)(h), emb


class DiT(nn.Module):
  """DiT on NHWC latents (module docstring): (x (B, H, W, C), t (B,), class_labels (B,) int) -> (B, H, W, out).

  ``remat``: gradient checkpointing of every block; ``attention_impl``: a ``models.attention``
  implementation name (None: 'auto').
  """

  config: DiTConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, class_labels: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, channels = x.shape
    p = c.patch_size
    if channels != c.in_channels or height % p or width % p:
      raise ValueError(f'DiT takes (B, H, W, {c.in_channels}) with H and W multiples of {p}, got {x.shape}')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (b,))
    h = PatchEmbed(c.width, p, c.sample_size // p, name='pos_embed', **kw)(x)
    block = nn.remat(DiTBlock) if self.remat else DiTBlock
    cond = None
    for i in range(c.num_layers):
      h, emb = block(c, self.attention_impl, name=f'transformer_blocks_{i}', **kw)(h, t, labels)
      cond = emb if i == 0 else cond  # the output layer reuses block 0's embedding, as diffusers does
    shift, scale = jnp.split(dense(2 * c.width, name='proj_out_1', **kw)(nn.silu(cond)), 2, axis=-1)
    h = modulate(h, shift[:, None], scale[:, None])
    return unpatchify(dense(p * p * c.outputs, name='proj_out_2', **kw)(h), height // p, width // p, p)


def init_dit(net: DiT, key: Array) -> dict:
  """(Boxed) parameters of ``net`` from a (1, sample_size, sample_size, C) input."""
  c = net.config
  x = jnp.zeros((1, c.sample_size, c.sample_size, c.in_channels), net.dtype)
  return net.init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))['params']
