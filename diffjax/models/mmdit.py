"""MMDiT (Esser et al. 2024): Stable Diffusion 3 / 3.5's transformer, as diffusers' ``SD3Transformer2DModel``
computes it.

* ``pos_embed``: p x p patches (``proj``) plus a 2-D sin-cos table over a ``pos_embed_max_size``
  square grid that the checkpoint stores (``pos_embed``, a parameter here), centre-cropped to the
  latent grid: rows from (max - h) // 2, columns from (max - w) // 2.
* ``time_text_embed``: the timestep MLP of a 256-channel sinusoid (cos first, no frequency shift) plus
  a SiLU MLP of the pooled text vector (``text_embedder``): ``temb`` (B, D).
* ``context_embedder`` maps the text tokens (CLIP-L and CLIP-G states zero-padded to 4096 channels,
  then T5's) to ``caption_projection_dim`` = D.
* Each joint block modulates both streams with adaLN-Zero of ``temb`` (the last block's text
  stream: ``AdaLayerNormContinuous`` and no MLP, ``context_pre_only``), attends over the
  concatenation [image tokens, text tokens] with per-stream q, k, v (optionally RMS-normed per head,
  SD3.5) and projects each stream back (``to_out``, ``to_add_out``); SD3.5 Medium's MMDiT-X blocks
  (``dual_attention_layers``) add a second, image-only self-attention with its own three modulations.
* ``norm_out`` (scale, then shift, from ``temb``) and ``proj_out`` to p x p x out_channels, unpatchified.

Images are NHWC: ``__call__(x (B, H, W, C), t (B,) in [0, 1000], context (B, L, joint_attention_dim),
pooled (B, pooled_projection_dim))`` -> (B, H, W, out_channels): the flow-matching velocity.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.attention import dot_product_attention
from diffjax.models.dit import Modulation, modulate, plain_norm, sincos_position_table, unpatchify
from diffjax.models.layers import Dtype, FeedForward, RMSNorm, TimestepMLP, conv, dense, split_heads, timestep_embedding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Sizes of an MMDiT; the defaults are SD3 Medium's (``stabilityai/stable-diffusion-3-medium-diffusers``)."""

  sample_size: int = 128  # latent side; the position table's base is sample_size / patch_size
  patch_size: int = 2
  in_channels: int = 16
  out_channels: int | None = 16  # None: in_channels
  num_layers: int = 24
  head_dim: int = 64
  num_heads: int = 24
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1536
  pooled_projection_dim: int = 2048
  pos_embed_max_size: int = 192
  dual_attention_layers: tuple[int, ...] = ()  # SD3.5 Medium: (0, ..., 12)
  qk_norm: str | None = None  # SD3.5: 'rms_norm'

  def __post_init__(self):
    if self.qk_norm not in (None, 'rms_norm'):
      raise ValueError(f"MMDiTConfig.qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
    if self.caption_projection_dim != self.width:  # the text stream joins the image stream's attention
      raise ValueError(f'MMDiTConfig.caption_projection_dim ({self.caption_projection_dim}) must equal '
                       f'num_heads * head_dim ({self.width})')

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def outputs(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels


MMDIT_CONFIGS: dict[str, MMDiTConfig] = {
    'tiny': MMDiTConfig(sample_size=8, in_channels=4, out_channels=4, num_layers=2, head_dim=8, num_heads=2,
                        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12,
                        pos_embed_max_size=16),
    'sd3_medium': MMDiTConfig(),
    'sd35_medium': MMDiTConfig(num_layers=24, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                               qk_norm='rms_norm'),
    'sd35_large': MMDiTConfig(num_layers=38, num_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                              qk_norm='rms_norm'),
}


class _PatchEmbed(nn.Module):
  config: MMDiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    p, top = c.patch_size, c.pos_embed_max_size
    h = conv(c.width, p, stride=p, padding='VALID', name='proj', dtype=self.dtype,
             param_dtype=self.param_dtype)(x.astype(self.dtype))
    b, rows, cols, d = h.shape
    if rows > top or cols > top:
      raise ValueError(f'a {x.shape[1]}x{x.shape[2]} latent is {rows}x{cols} patches: more than the position '
                       f'table serves (pos_embed_max_size={top}, i.e. up to {top * p}x{top * p} latents)')
    table = self.param('pos_embed', lambda key, shape, dtype: jnp.asarray(
        sincos_position_table(d, top, top, c.sample_size // p)[None], dtype), (1, top * top, d), self.param_dtype)
    first_row, first_col = (top - rows) // 2, (top - cols) // 2
    crop = table.reshape(top, top, d)[first_row:first_row + rows, first_col:first_col + cols].reshape(rows * cols, d)
    return (h.reshape(b, rows * cols, d) + crop[None].astype(h.dtype)).astype(self.dtype)


class _TimeTextEmbedding(nn.Module):  # diffusers' CombinedTimestepTextProjEmbeddings
  config: MMDiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, pooled: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoid = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0).astype(self.dtype)
    time = TimestepMLP(self.config.width, name='timestep_embedder', **kw)(sinusoid)
    return time + TimestepMLP(self.config.width, name='text_embedder', **kw)(pooled.astype(self.dtype))


class _JointAttention(nn.Module):
  """Attention over [image tokens, text tokens] with per-stream projections (``text`` None: image only)."""

  config: MMDiTConfig
  text_output: bool = True  # False for the last block (context_pre_only): no to_add_out
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, text: Array | None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = lambda a: split_heads(a, c.num_heads)

    def qkv(h, names, norms):
      q, k, v = (heads(dense(c.width, name=n, **kw)(h)) for n in names)
      if c.qk_norm == 'rms_norm':
        q, k = RMSNorm(1e-6, name=norms[0], **kw)(q), RMSNorm(1e-6, name=norms[1], **kw)(k)
      return q, k, v

    q, k, v = qkv(x, ('to_q', 'to_k', 'to_v'), ('norm_q', 'norm_k'))
    n = x.shape[1]
    if text is not None:
      tq, tk, tv = qkv(text, ('add_q_proj', 'add_k_proj', 'add_v_proj'), ('norm_added_q', 'norm_added_k'))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, tq), (k, tk), (v, tv)))
    o = dot_product_attention(q, k, v, implementation=self.attention_impl)
    o = o.reshape(*o.shape[:2], c.width)
    image = dense(c.width, name='to_out_0', **kw)(o[:, :n])
    if text is None or not self.text_output:
      return image, None
    return image, dense(c.width, name='to_add_out', **kw)(o[:, n:])


class JointBlock(nn.Module):
  """One MMDiT block: (image (B, N, D), text (B, L, D), temb (B, D)) -> (image, text or None after the last)."""

  config: MMDiTConfig
  last: bool = False  # context_pre_only: the text stream is read, not updated
  dual_attention: bool = False  # MMDiT-X: a second, image-only attention
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, text: Array, temb: Array):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mods = Modulation(9 if self.dual_attention else 6, name='norm1', **kw)(temb)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    normed = plain_norm(x, 1e-6)
    h = normed * (1 + scale) + shift
    if self.last:  # AdaLayerNormContinuous: scale first, then shift
      t_scale, t_shift = Modulation(2, name='norm1_context', **kw)(temb)
      th = modulate(text, t_shift, t_scale)
    else:
      t_shift, t_scale, t_gate, t_shift_mlp, t_scale_mlp, t_gate_mlp = Modulation(6, name='norm1_context', **kw)(temb)
      th = modulate(text, t_shift, t_scale)
    attn, t_attn = _JointAttention(c, not self.last, self.attention_impl, name='attn', **kw)(h, th)
    x = x + gate * attn
    if self.dual_attention:
      shift2, scale2, gate2 = mods[6:]
      attn2, _ = _JointAttention(c, False, self.attention_impl, name='attn2', **kw)(normed * (1 + scale2) + shift2,
                                                                                    None)
      x = x + gate2 * attn2
    h = modulate(x, shift_mlp, scale_mlp)
    x = x + gate_mlp * FeedForward(activation='gelu-approximate', name='ff', **kw)(h)
    if self.last:
      return x, None
    text = text + t_gate * t_attn
    th = modulate(text, t_shift_mlp, t_scale_mlp)
    return x, text + t_gate_mlp * FeedForward(activation='gelu-approximate', name='ff_context', **kw)(th)


class MMDiT(nn.Module):
  """SD3's transformer on NHWC latents (module docstring).

  ``remat``: gradient checkpointing of every block; ``attention_impl``: a ``models.attention``
  implementation name (None: 'auto').
  """

  config: MMDiTConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, context: Array, pooled: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, channels = x.shape
    p = c.patch_size
    if channels != c.in_channels or height % p or width % p:
      raise ValueError(f'MMDiT takes (B, H, W, {c.in_channels}) with H and W multiples of {p}, got {x.shape}')
    if context.shape[-1] != c.joint_attention_dim or pooled.shape[-1] != c.pooled_projection_dim:
      raise ValueError(f'MMDiT takes context (B, L, {c.joint_attention_dim}) and pooled (B, '
                       f'{c.pooled_projection_dim}), got {context.shape} and {pooled.shape}')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    h = _PatchEmbed(c, name='pos_embed', **kw)(x)
    temb = _TimeTextEmbedding(c, name='time_text_embed', **kw)(t, pooled)
    text = dense(c.caption_projection_dim, name='context_embedder', **kw)(context.astype(self.dtype))
    block = nn.remat(JointBlock) if self.remat else JointBlock
    for i in range(c.num_layers):
      h, text = block(c, i == c.num_layers - 1, i in c.dual_attention_layers, self.attention_impl,
                      name=f'transformer_blocks_{i}', **kw)(h, text, temb)
      self.sow('intermediates', 'image_tokens', h)  # (B, N, width) after each block: REPA reads one (train/repa.py)
    scale, shift = Modulation(2, name='norm_out', **kw)(temb)
    h = modulate(h, shift, scale)
    return unpatchify(dense(p * p * c.outputs, name='proj_out', **kw)(h), height // p, width // p, p)


def init_mmdit(net: MMDiT, key: Array, context_len: int = 8) -> dict:
  """(Boxed) parameters of ``net`` from a (1, sample_size, sample_size, C) input and ``context_len`` text tokens."""
  c = net.config
  x = jnp.zeros((1, c.sample_size, c.sample_size, c.in_channels), net.dtype)
  return net.init(key, x, jnp.zeros((1,)), jnp.zeros((1, context_len, c.joint_attention_dim)),
                  jnp.zeros((1, c.pooled_projection_dim)))['params']
