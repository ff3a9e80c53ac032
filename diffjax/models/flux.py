"""Flux (Black Forest Labs 2024): double-stream MMDiT blocks, then single-stream parallel blocks, with 3-axis
rotary positions, as diffusers' ``FluxTransformer2DModel`` computes it.

* Tokens: the pipeline packs 2 x 2 latent patches into channels (``pack_latents``; (c, ph, pw) order)
  and ``x_embedder`` maps them to D; ``context_embedder`` maps T5's tokens to D.
* ``time_text_embed``: timestep (and, for guidance-distilled models, the guidance scale) as
  256-channel sinusoids (cos first, no shift) of 1000 t through SiLU MLPs, plus a SiLU MLP of CLIP's
  pooled vector.
* Rotary positions: each token has 3 integer ids (``txt_ids`` zeros, ``image_ids`` (0, row, col));
  axis i rotates ``axes_dims_rope[i]`` channels of every head by angles id * theta^(-2j / dim_i)
  (theta 10000) on interleaved channel pairs, after the per-head RMS norm of q and k.
* Double blocks (``transformer_blocks``): as SD3's joint blocks with the sequence [text, image], QK
  RMS norms always, and both streams updated in every block.
* Single blocks (``single_transformer_blocks``): on [text, image] concatenated, one adaLN-Zero
  (shift, scale, gate) feeds attention (no output projection) and a tanh-GELU MLP of 4 D in
  parallel; ``proj_out`` maps their concatenation (5 D) back to D, gated, residual.
* ``norm_out`` (scale, then shift) and ``proj_out`` give each image token's p x p x out channels.

``__call__(tokens (B, N, in_channels), t (B,) in [0, 1], context (B, L, joint_attention_dim), pooled
(B, pooled_projection_dim), rotary (cos, sin) of (L + N, head_dim) from ``rotary_for``, guidance (B,)
or None)`` -> (B, N, out).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.attention import dot_product_attention
from diffjax.models.dit import Modulation, modulate
from diffjax.models.layers import Dtype, FeedForward, RMSNorm, TimestepMLP, dense, split_heads, timestep_embedding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """Sizes of a Flux transformer; the defaults are FLUX.1 [dev]'s (guidance-distilled)."""

  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None  # None: in_channels
  num_layers: int = 19
  num_single_layers: int = 38
  head_dim: int = 128
  num_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = True  # FLUX.1 [schnell]: False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  rope_theta: float = 10000.0
  mlp_ratio: float = 4.0

  def __post_init__(self):
    if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
      raise ValueError(f'FluxConfig.axes_dims_rope {self.axes_dims_rope} must be even and sum to head_dim '
                       f'({self.head_dim})')

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def outputs(self) -> int:
    return self.out_channels or self.in_channels


FLUX_CONFIGS: dict[str, FluxConfig] = {
    'tiny': FluxConfig(in_channels=16, num_layers=1, num_single_layers=2, head_dim=8, num_heads=2,
                       joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4)),
    'flux1_dev': FluxConfig(),
    'flux1_schnell': FluxConfig(guidance_embeds=False),
}


def pack_latents(z: Array) -> Array:
  """(B, H, W, C) latents -> (B, H/2 * W/2, 4 C) tokens of 2 x 2 patches, channels in (c, row, col) order."""
  b, h, w, c = z.shape
  return z.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2 * (w // 2), 4 * c)


def unpack_latents(tokens: Array, height: int, width: int) -> Array:
  """The inverse of ``pack_latents``: (B, H/2 * W/2, 4 C) -> (B, H, W, C)."""
  b, _, c4 = tokens.shape
  c = c4 // 4
  return tokens.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, height, width, c)


def image_ids(rows: int, cols: int) -> np.ndarray:
  """(rows * cols, 3) position ids of a row-major token grid: (0, row, col)."""
  ids = np.zeros((rows, cols, 3), np.float32)
  ids[..., 1] = np.arange(rows)[:, None]
  ids[..., 2] = np.arange(cols)[None, :]
  return ids.reshape(rows * cols, 3)


def rotary_angles(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = 10000.0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (S, sum(axes_dims)) float32, of the rotary angles of ``ids`` (S, axes): axis i's
  channels rotate by id_i * theta^(-2j / dim_i), each frequency repeated for its interleaved pair.

  Computed in NumPy float64 and rounded once, as diffusers' ``FluxPosEmbed`` does (an angle of 100
  computed in float32 would be off by ~4e-6): pass the result to ``Flux`` as ``rotary``.
  """
  ids = np.asarray(ids, np.float64)
  if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
    raise ValueError(f'rotary ids must be (S, {len(axes_dims)}), got {ids.shape}')
  cos, sin = [], []
  for i, dim in enumerate(axes_dims):
    angles = np.outer(ids[:, i], 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    cos.append(np.repeat(np.cos(angles), 2, axis=1))
    sin.append(np.repeat(np.sin(angles), 2, axis=1))
  return np.concatenate(cos, 1).astype(np.float32), np.concatenate(sin, 1).astype(np.float32)


def rotary_for(config: FluxConfig, image_ids: np.ndarray, txt_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``rotary_angles`` of the sequence [text, image] the blocks attend over."""
  return rotary_angles(np.concatenate([np.asarray(txt_ids), np.asarray(image_ids)]), config.axes_dims_rope,
                       config.rope_theta)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates interleaved channel pairs (x_2j, x_2j+1) of (B, S, N, H) by the angles (S, H) (cos, sin)."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x.astype(jnp.float32) * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


class _FluxAttention(nn.Module):
  """Attention with QK RMS norms and rotary positions; with ``text`` (double blocks) per-stream projections
  over [text, image], else (single blocks, ``pre_only``) the given sequence and no output projection."""

  config: FluxConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, text: Array | None, cos: Array, sin: Array):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def qkv(h, names, norms):
      q, k, v = (split_heads(dense(c.width, name=n, **kw)(h), c.num_heads) for n in names)
      return RMSNorm(1e-6, name=norms[0], **kw)(q), RMSNorm(1e-6, name=norms[1], **kw)(k), v

    q, k, v = qkv(x, ('to_q', 'to_k', 'to_v'), ('norm_q', 'norm_k'))
    if text is not None:
      tq, tk, tv = qkv(text, ('add_q_proj', 'add_k_proj', 'add_v_proj'), ('norm_added_q', 'norm_added_k'))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((tq, q), (tk, k), (tv, v)))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = dot_product_attention(q, k, v, implementation=self.attention_impl)
    o = o.reshape(*o.shape[:2], c.width)
    if text is None:
      return o
    n = text.shape[1]
    return dense(c.width, name='to_out_0', **kw)(o[:, n:]), dense(c.width, name='to_add_out', **kw)(o[:, :n])


class DoubleBlock(nn.Module):
  """(image (B, N, D), text (B, L, D), temb (B, D), rotary (cos, sin)) -> (image, text)."""

  config: FluxConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, text, temb, cos, sin):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = Modulation(6, name='norm1', **kw)(temb)
    t_shift, t_scale, t_gate, t_shift_mlp, t_scale_mlp, t_gate_mlp = Modulation(6, name='norm1_context', **kw)(temb)
    attn, t_attn = _FluxAttention(c, self.attention_impl, name='attn', **kw)(
        modulate(x, shift, scale), modulate(text, t_shift, t_scale), cos, sin)
    x = x + gate * attn
    x = x + gate_mlp * FeedForward(activation='gelu-approximate', name='ff', **kw)(
        modulate(x, shift_mlp, scale_mlp))
    text = text + t_gate * t_attn
    text = text + t_gate_mlp * FeedForward(activation='gelu-approximate', name='ff_context', **kw)(
        modulate(text, t_shift_mlp, t_scale_mlp))
    return x, text


class SingleBlock(nn.Module):
  """(tokens [text, image] (B, L + N, D), temb (B, D), rotary (cos, sin)) -> tokens."""

  config: FluxConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, cos, sin):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale, gate = Modulation(3, name='norm', **kw)(temb)
    h = modulate(x, shift, scale)
    mlp = nn.gelu(dense(int(c.width * c.mlp_ratio), name='proj_mlp', **kw)(h), approximate=True)
    attn = _FluxAttention(c, self.attention_impl, name='attn', **kw)(h, None, cos, sin)
    return x + gate * dense(c.width, name='proj_out', **kw)(jnp.concatenate([attn, mlp], axis=-1))


class _TimeTextEmbedding(nn.Module):  # CombinedTimestep[Guidance]TextProjEmbeddings
  config: FluxConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t, guidance, pooled):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoid = lambda v: timestep_embedding(v, 256, flip_sin_to_cos=True).astype(self.dtype)
    emb = TimestepMLP(c.width, name='timestep_embedder', **kw)(sinusoid(t))
    if c.guidance_embeds:
      emb = emb + TimestepMLP(c.width, name='guidance_embedder', **kw)(sinusoid(guidance))
    return emb + TimestepMLP(c.width, name='text_embedder', **kw)(pooled.astype(self.dtype))


class Flux(nn.Module):
  """Flux on packed latent tokens (module docstring).

  ``remat``: gradient checkpointing of every block; ``attention_impl``: a ``models.attention``
  implementation name (None: 'auto').
  """

  config: FluxConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, t: Array, context: Array, pooled: Array, rotary: tuple[Array, Array],
               guidance: Array | None = None) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, channels = tokens.shape
    if channels != c.in_channels:
      raise ValueError(f'Flux takes packed tokens (B, N, {c.in_channels}), got {tokens.shape}')
    if c.guidance_embeds and guidance is None:
      raise ValueError('this Flux is guidance-distilled (guidance_embeds): pass guidance (B,), e.g. 3.5')
    cos, sin = rotary
    if cos.shape != (context.shape[1] + n, c.head_dim) or sin.shape != cos.shape:
      raise ValueError(f'Flux needs rotary (cos, sin) of ({context.shape[1] + n}, {c.head_dim}) for '
                       f'{context.shape[1]} text and {n} image tokens (rotary_for), got {cos.shape}, {sin.shape}')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,)) * 1000.0
    guidance = None if guidance is None else jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,)) * 1000.0
    x = dense(c.width, name='x_embedder', **kw)(tokens.astype(self.dtype))
    temb = _TimeTextEmbedding(c, name='time_text_embed', **kw)(t, guidance, pooled)
    text = dense(c.width, name='context_embedder', **kw)(context.astype(self.dtype))
    double = nn.remat(DoubleBlock) if self.remat else DoubleBlock
    for i in range(c.num_layers):
      x, text = double(c, self.attention_impl, name=f'transformer_blocks_{i}', **kw)(x, text, temb, cos, sin)
    single = nn.remat(SingleBlock) if self.remat else SingleBlock
    h = jnp.concatenate([text, x], axis=1)
    for i in range(c.num_single_layers):
      h = single(c, self.attention_impl, name=f'single_transformer_blocks_{i}', **kw)(h, temb, cos, sin)
    x = h[:, text.shape[1]:]
    scale, shift = Modulation(2, name='norm_out', **kw)(temb)
    x = modulate(x, shift, scale)
    return dense(c.patch_size ** 2 * c.outputs, name='proj_out', **kw)(x).astype(jnp.float32)


def init_flux(net: Flux, key: Array, rows: int = 4, cols: int = 4, context_len: int = 8) -> dict:
  """(Boxed) parameters of ``net`` from a (1, rows * cols, in_channels) token grid and ``context_len`` text tokens."""
  c = net.config
  axes = len(c.axes_dims_rope)
  rotary = rotary_for(c, image_ids(rows, cols), np.zeros((context_len, axes), np.float32))
  return net.init(key, jnp.zeros((1, rows * cols, c.in_channels), net.dtype), jnp.zeros((1,)),
                  jnp.zeros((1, context_len, c.joint_attention_dim)), jnp.zeros((1, c.pooled_projection_dim)),
                  rotary, jnp.zeros((1,)) if c.guidance_embeds else None)['params']
