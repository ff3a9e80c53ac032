"""The Stable Diffusion U-Net (Rombach et al. 2022) and its pixel-space relatives, NHWC.

The architecture is diffusers' ``UNet2DConditionModel`` with the SD block types:
each resolution level has ``layers_per_block`` ResNet blocks (optionally each followed
by a spatial transformer with self- and cross-attention) and a stride-2 downsampler;
a middle block (ResNet, transformer, ResNet); and a mirrored decoder with
``layers_per_block + 1`` ResNet blocks per level that consume the encoder's skip
connections. Pixel-space options: class labels or a pooled text vector added to the
timestep embedding, scale-shift (AdaGN) norm, dropout, no cross-attention.

Usage::

  cfg = UNET_CONFIGS['sd15']
  net = UNet(cfg, dtype=jnp.bfloat16)
  params = net.init(key, x, t, context)['params']
  eps = net.apply({'params': params}, x, t, context)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.layers import (
  Downsample,
  Dtype,
  ResnetBlock,
  SpatialTransformer,
  TimestepMLP,
  Upsample,
  conv,
  embed,
  group_norm,
  timestep_embedding,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a ``UNet``. Per-level tuples are ordered from the highest resolution down.

  Attributes:
    in_channels, out_channels: image / latent channels (SD: 4, 4).
    block_out_channels: channels per resolution level (SD: 320, 640, 1280, 1280).
    layers_per_block: ResNet blocks per level in the encoder (decoder: one more).
    attention_levels: whether each level has spatial transformers.
    num_heads: attention heads per level (int: the same everywhere). Note that the
      diffusers config key ``attention_head_dim`` of SD 1.x/2.x holds this number.
    head_dim: if set, heads = channels // head_dim (overrides ``num_heads``).
    transformer_depth: transformer blocks per spatial transformer, per level (int: the same
      everywhere; SDXL: (1, 2, 10)); the middle block has the last level's.
    cross_attention_dim: width D of the context; None for self-attention only.
    use_linear_projection: linear (SD 2.x) instead of 1x1-conv (SD 1.x) proj_in/out.
    mid_block_attention: a transformer between the two middle ResNet blocks.
    norm_num_groups, norm_eps: GroupNorm of the ResNet blocks and output.
    flip_sin_to_cos, freq_shift: timestep embedding convention (see ``timestep_embedding``).
    resnet_scale_shift: AdaGN scale-shift conditioning in the ResNet blocks.
    dropout: dropout rate in the ResNet blocks.
    num_classes: class-conditional model (labels (B,) int added via an embedding table).
    pooled_dim: condition on a pooled vector (B, pooled_dim) through a 2-layer MLP.
    only_cross_attention: per level (bool: the same everywhere), the transformer blocks' first
      attention attends to the context instead of the pixels (``layers.TransformerBlock``; the
      x4 upscaler: (True, True, True, False)); the decoder mirrors it, the middle block never has it
      (diffusers' ``UNetMidBlock2DCrossAttn`` ignores the option).
    addition_time_embed_dim, addition_embed_dim: SDXL's "text_time" conditioning (both set or
      both None): each of the n time ids (B, n) gets a sinusoidal embedding of
      ``addition_time_embed_dim`` (the timestep's convention); concatenated after the pooled
      text embedding (B, P) they give (B, addition_embed_dim = P + n * addition_time_embed_dim),
      which a 2-layer MLP ('add_embedding') maps onto the timestep embedding, added.
  """

  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_levels: tuple[bool, ...] = (True, True, True, False)
  num_heads: int | tuple[int, ...] = 8
  head_dim: int | None = None
  transformer_depth: int | tuple[int, ...] = 1
  cross_attention_dim: int | None = 768
  use_linear_projection: bool = False
  mid_block_attention: bool = True
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  resnet_scale_shift: bool = False
  dropout: float = 0.0
  num_classes: int | None = None
  pooled_dim: int | None = None
  only_cross_attention: bool | tuple[bool, ...] = False
  addition_time_embed_dim: int | None = None
  addition_embed_dim: int | None = None

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.attention_levels) != n:
      raise ValueError(f'attention_levels has {len(self.attention_levels)} entries, block_out_channels {n}')
    if not isinstance(self.num_heads, int) and len(self.num_heads) != n:
      raise ValueError(f'num_heads has {len(self.num_heads)} entries, block_out_channels {n}')
    if self.num_classes is not None and self.pooled_dim is not None:
      raise ValueError('num_classes and pooled_dim are exclusive')
    if not isinstance(self.transformer_depth, int) and len(self.transformer_depth) != n:
      raise ValueError(f'transformer_depth has {len(self.transformer_depth)} entries, block_out_channels {n}')
    if not isinstance(self.only_cross_attention, bool) and len(self.only_cross_attention) != n:
      raise ValueError(f'only_cross_attention has {len(self.only_cross_attention)} entries, block_out_channels {n}')
    if (self.addition_time_embed_dim is None) != (self.addition_embed_dim is None):
      raise ValueError('addition_time_embed_dim and addition_embed_dim are set together (text_time conditioning)')

  def heads(self) -> tuple[int, ...]:
    """Attention heads per level."""
    if self.head_dim is not None:
      return tuple(ch // self.head_dim for ch in self.block_out_channels)
    if isinstance(self.num_heads, int):
      return (self.num_heads,) * len(self.block_out_channels)
    return tuple(self.num_heads)

  def depths(self) -> tuple[int, ...]:
    """Transformer blocks per spatial transformer, per level."""
    d = self.transformer_depth
    return (d,) * len(self.block_out_channels) if isinstance(d, int) else tuple(d)

  def only_cross(self) -> tuple[bool, ...]:
    """Per level: whether the transformers attend to the context alone (``only_cross_attention``)."""
    o = self.only_cross_attention
    return (o,) * len(self.block_out_channels) if isinstance(o, bool) else tuple(o)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]


UNET_CONFIGS: dict[str, UNetConfig] = {
    # ~0.3M parameters, for tests: 2 levels, 8x8 latents are enough.
    'tiny': UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                       num_heads=2, cross_attention_dim=32, norm_num_groups=8),
    # Stable Diffusion 1.x (CLIP ViT-L/14 context, 1x1-conv projections, 8 heads).
    'sd15': UNetConfig(),
    # Stable Diffusion 2.x (OpenCLIP ViT-H/14 context, linear projections, 64-dim heads).
    'sd21': UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
}


def _resnet(remat: bool):
  return nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock


class _Common(nn.Module):
  """Fields shared by the U-Net's level blocks."""

  cfg: UNetConfig
  channels: int
  attention: bool
  heads: int
  depth: int = 1  # transformer blocks per spatial transformer
  only_cross: bool = False  # the transformers' first attention attends to the context
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _res(self, name: str):
    c = self.cfg
    return _resnet(self.remat)(self.channels, c.norm_num_groups, c.norm_eps, c.resnet_scale_shift, c.dropout,
                               self.dtype, self.param_dtype, name=name)

  def _attn(self, name: str):
    c = self.cfg
    return SpatialTransformer(
        self.heads, self.channels // self.heads, self.depth, c.use_linear_projection,
        c.cross_attention_dim is not None, c.norm_num_groups, only_cross_attention=self.only_cross, remat=self.remat,
        implementation=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DownBlock(_Common):
  """One encoder level: (ResNet [+ transformer]) x layers_per_block, then an optional downsampler.

  Returns (h, skips): the output and every intermediate feature map for the decoder.
  """

  add_downsample: bool = True

  @nn.compact
  def __call__(self, h, temb, context, deterministic):
    skips = []
    for j in range(self.cfg.layers_per_block):
      h = self._res(f'resnets_{j}')(h, temb, deterministic)
      if self.attention:
        h = self._attn(f'attentions_{j}')(h, context, deterministic)
      skips.append(h)
    if self.add_downsample:
      h = Downsample(self.channels, 1, self.dtype, self.param_dtype, name='downsamplers_0')(h)
      skips.append(h)
    return h, skips


class MidBlock(_Common):
  """ResNet, [transformer], ResNet at the lowest resolution."""

  @nn.compact
  def __call__(self, h, temb, context, deterministic):
    h = self._res('resnets_0')(h, temb, deterministic)
    if self.attention:
      h = self._attn('attentions_0')(h, context, deterministic)
    return self._res('resnets_1')(h, temb, deterministic)


class UpBlock(_Common):
  """One decoder level: (concat skip, ResNet [+ transformer]) x (layers_per_block + 1), optional upsampler.

  ``skips``: this level's ``layers_per_block + 1`` encoder features, in encoder order (consumed last first).
  """

  add_upsample: bool = True

  @nn.compact
  def __call__(self, h, skips, temb, context, deterministic):
    for j, skip in enumerate(reversed(skips)):
      h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
      h = self._res(f'resnets_{j}')(h, temb, deterministic)
      if self.attention:
        h = self._attn(f'attentions_{j}')(h, context, deterministic)
    if self.add_upsample:
      h = Upsample(self.channels, self.dtype, self.param_dtype, name='upsamplers_0')(h)
    return h


class UNetEncoder:
  """The U-Net's time embedding and encoder (down blocks and middle block), shared by ``UNet`` and
  ``diffjax.models.controlnet.ControlNet``: mixed into a linen Module with the fields ``config`` (a
  ``UNetConfig``), ``remat``, ``attention_impl``, ``dtype`` and ``param_dtype``, and called from its
  compact ``__call__`` (the submodules' names are the U-Net's, so the parameters are too)."""

  def _block_options(self) -> dict:
    return dict(remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)

  def _time_embedding(self, t, class_labels, text_embeds, time_ids, batch: int) -> Array:
    """The timestep embedding (+ the class or pooled-vector embedding, + SDXL's text_time) -> (B, time_embed_dim)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    temb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                              downscale_freq_shift=c.freq_shift)
    temb = TimestepMLP(c.time_embed_dim, name='time_embedding', **kw)(temb.astype(self.dtype))
    if c.num_classes is not None or c.pooled_dim is not None:
      if class_labels is None:
        raise ValueError(f'this {type(self).__name__} is class-conditional: pass class_labels')
      if c.num_classes is not None:
        temb = temb + embed(c.num_classes, c.time_embed_dim, name='class_embedding', **kw)(class_labels)
      else:
        temb = temb + TimestepMLP(c.time_embed_dim, name='class_embedding', **kw)(class_labels.astype(self.dtype))
    if c.addition_time_embed_dim is not None:
      temb = temb + self._text_time(text_embeds, time_ids, batch)
    return temb

  def _text_time(self, text_embeds, time_ids, batch: int) -> Array:
    """SDXL's added embedding: MLP(concat(text_embeds (B, P), sinusoids of time_ids (B, n))) -> (B, time_embed_dim)."""
    c = self.config
    if text_embeds is None or time_ids is None:
      raise ValueError('this U-Net has text_time conditioning (SDXL): pass text_embeds (B, P) and time_ids (B, n)')
    ids = jnp.asarray(time_ids, jnp.float32)
    ids = jnp.broadcast_to(ids, (batch, ids.shape[-1]))
    if text_embeds.shape[-1] + ids.shape[-1] * c.addition_time_embed_dim != c.addition_embed_dim:
      raise ValueError(f'text_embeds {text_embeds.shape} and time_ids {ids.shape} embed to '
                       f'{text_embeds.shape[-1]} + {ids.shape[-1]} x {c.addition_time_embed_dim} features; this U-Net '
                       f'expects addition_embed_dim = {c.addition_embed_dim}')
    sin = timestep_embedding(ids.reshape(-1), c.addition_time_embed_dim, flip_sin_to_cos=c.flip_sin_to_cos,
                             downscale_freq_shift=c.freq_shift).reshape(batch, -1)
    add = jnp.concatenate([text_embeds.astype(self.dtype), sin.astype(self.dtype)], axis=-1)
    return TimestepMLP(c.time_embed_dim, name='add_embedding', dtype=self.dtype, param_dtype=self.param_dtype)(add)

  def _encoder(self, h, temb, context, deterministic) -> tuple[list[Array], Array]:
    """``conv_in``'s output h through the down blocks and the middle block: (every skip connection in encoder
    order, starting with h itself; the middle block's output)."""
    c = self.config
    heads, depths, only_cross = c.heads(), c.depths(), c.only_cross()
    skips = [h]
    for i, ch in enumerate(c.block_out_channels):
      h, s = DownBlock(c, ch, c.attention_levels[i], heads[i], depths[i], only_cross=only_cross[i],
                       add_downsample=i < len(c.block_out_channels) - 1, name=f'down_blocks_{i}',
                       **self._block_options())(h, temb, context, deterministic)
      skips += s
    h = MidBlock(c, c.block_out_channels[-1], c.mid_block_attention, heads[-1], depths[-1], name='mid_block',
                 **self._block_options())(h, temb, context, deterministic)
    return skips, h


class UNet(UNetEncoder, nn.Module):
  """Conditional U-Net noise predictor.

  Attributes:
    config: the architecture.
    remat: gradient checkpointing of every ResNet and transformer block (same outputs
      and gradients, less activation memory, ~30% more compute).
    attention_impl: a ``diffjax.models.attention`` implementation name (None: 'auto': cuDNN on
      GPU for 16-bit dtypes, splash on TPU, tiles for long self-attention on CPU, else XLA).
    dtype: computation dtype (e.g. bfloat16); param_dtype: parameter storage dtype.
  """

  config: UNetConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, context: Array | None = None, class_labels: Array | None = None, *,
               text_embeds: Array | None = None, time_ids: Array | None = None, deterministic: bool = True,
               down_residuals: tuple[Array, ...] | None = None, mid_residual: Array | None = None) -> Array:
    """Predicts the network target (eps, v, ...) for noisy inputs.

    Args:
      x: (B, H, W, in_channels) noisy latents/images, NHWC; H and W divisible by
        2 ** (levels - 1).
      t: (B,) or scalar times in the units the model was trained with (SD: discrete
        steps 0..999); float.
      context: (B, L, cross_attention_dim) text-encoder hidden states; required when
        ``cross_attention_dim`` is set.
      class_labels: (B,) int labels with ``num_classes``, or (B, pooled_dim) pooled
        vectors with ``pooled_dim``.
      text_embeds, time_ids: with ``addition_time_embed_dim`` (SDXL), the pooled text embedding
        (B, P) and the micro-conditioning ids (B, n) or (n,) (SDXL: original size (h, w), crop
        top-left (y, x), target size (h, w) in pixels, n = 6); P + n * addition_time_embed_dim
        must equal ``addition_embed_dim``.
      deterministic: disables dropout; else an rng named 'dropout' is needed.
      down_residuals: ControlNet residuals added to the skip connections before the decoder reads them
        (diffusers' ``down_block_additional_residuals``): one per skip in encoder order (``conv_in``'s, then
        per level each block's and the downsampler's: 1 + levels x layers_per_block + levels - 1 arrays),
        each broadcastable to its skip (B, H / 2^l, W / 2^l, block_out_channels[l]).
      mid_residual: added to the middle block's output (diffusers' ``mid_block_additional_residual``),
        broadcastable to (B, H / 2^(levels-1), W / 2^(levels-1), block_out_channels[-1]).

    Returns:
      (B, H, W, out_channels) in ``dtype``.
    """
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = len(c.block_out_channels)
    heads, depths, only_cross = c.heads(), c.depths(), c.only_cross()
    if context is not None:
      context = context.astype(self.dtype)
    temb = self._time_embedding(t, class_labels, text_embeds, time_ids, x.shape[0])
    h = conv(c.block_out_channels[0], 3, name='conv_in', **kw)(x.astype(self.dtype))
    skips, h = self._encoder(h, temb, context, deterministic)
    if down_residuals is not None:
      skips = _add_residuals(skips, down_residuals)
    if mid_residual is not None:
      h = _add_residual(h, mid_residual, 'mid_residual')
    for i in range(levels):
      k = levels - 1 - i
      n = c.layers_per_block + 1
      skips, level_skips = skips[:-n], tuple(skips[-n:])
      h = UpBlock(c, c.block_out_channels[k], c.attention_levels[k], heads[k], depths[k], only_cross=only_cross[k],
                  add_upsample=i < levels - 1, name=f'up_blocks_{i}', **self._block_options())(
          h, level_skips, temb, context, deterministic)
    h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, name='conv_norm_out', **kw)(h))
    return conv(c.out_channels, 3, name='conv_out', **kw)(h)


def _add_residuals(skips: list[Array], residuals) -> list[Array]:
  """skips[i] + residuals[i] for the U-Net's skip connections; ValueError on a count that does not fit."""
  if len(residuals) != len(skips):
    raise ValueError(f'down_residuals has {len(residuals)} entries; this U-Net has {len(skips)} skip connections '
                     f'(conv_in, then per level layers_per_block and a downsampler but for the last level)')
  return [_add_residual(s, r, f'down_residuals[{i}]') for i, (s, r) in enumerate(zip(skips, residuals, strict=True))]


def _add_residual(feature: Array, residual, what: str) -> Array:
  """feature + residual (in the feature's dtype); ValueError unless the residual broadcasts to the feature."""
  try:
    fits = jnp.broadcast_shapes(feature.shape, jnp.shape(residual)) == feature.shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f'{what} has shape {jnp.shape(residual)}, which does not broadcast to the U-Net feature '
                     f'{feature.shape}')
  return feature + jnp.asarray(residual).astype(feature.dtype)


def dummy_inputs(c: UNetConfig, size: int = 8, context_len: int = 8) -> tuple[tuple, dict]:
  """Zero inputs (batch 1, size x size) for initialising a network of ``c``'s conditioning: ((x, t, context,
  class labels), {text_embeds, time_ids} for SDXL's text_time or {})."""
  x = jnp.zeros((1, size, size, c.in_channels))
  ctx = jnp.zeros((1, context_len, c.cross_attention_dim)) if c.cross_attention_dim else None
  labels = None
  if c.num_classes is not None:
    labels = jnp.zeros((1,), jnp.int32)
  elif c.pooled_dim is not None:
    labels = jnp.zeros((1, c.pooled_dim))
  added = {}
  if c.addition_time_embed_dim is not None:  # 6 time ids as SDXL (the MLP's input width is what matters)
    n = min(6, c.addition_embed_dim // c.addition_time_embed_dim)
    added = dict(text_embeds=jnp.zeros((1, c.addition_embed_dim - n * c.addition_time_embed_dim)),
                 time_ids=jnp.zeros((1, n)))
  return (x, jnp.zeros((1,)), ctx, labels), added


def init_unet(net: UNet, key: Array, size: int = 8, context_len: int = 8) -> dict:
  """Initialises ``net`` (jitted) on dummy inputs (batch 1, size x size); returns the (boxed) params."""
  args, added = dummy_inputs(net.config, size, context_len)
  return jax.jit(net.init)(key, *args, **added)['params']
