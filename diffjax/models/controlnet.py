"""ControlNet (Zhang, Rao and Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"), NHWC.

A trainable copy of a U-Net's encoder (time embedding, ``conv_in``, down blocks and
middle block; ``diffjax.models.unet``'s own modules) whose input is the noisy latent plus
a small convolutional embedding of the control image (edges, depth, pose ... at pixel
resolution, in [0, 1]). Each encoder feature the U-Net keeps as a skip connection, and the
middle block's output, passes a zero-initialised 1x1 convolution; the results are added
to the frozen U-Net's skips and middle output (``UNet(..., down_residuals=,
mid_residual=)``). Parameter names and the function equal diffusers' ``ControlNetModel``.

Usage::

  cfg = ControlNetConfig.from_unet(UNET_CONFIGS['sd15'])
  params = from_unet(unet_params, cfg, key=key)              # or convert.controlnet.load_controlnet(path)
  net = ControlNet(cfg)
  down, mid = net.apply({'params': params}, x, t, context, control_image, conditioning_scale=1.0)
  eps = unet.apply({'params': unet_params}, x, t, context, down_residuals=down, mid_residual=mid)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffjax.models.layers import (
  BIAS_AXES,
  CONV_KERNEL_AXES,
  Dtype,
  conv,
)
from diffjax.models.unet import UNetConfig, UNetEncoder, dummy_inputs

Array = jax.Array

# Top-level modules a ControlNet shares (by name and function) with the U-Net it was copied from.
SHARED_WITH_UNET = re.compile(r'conv_in|time_embedding|class_embedding|add_embedding|down_blocks_\d+|mid_block')


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
  """A ``UNetConfig`` (the encoder's architecture; ``out_channels`` is unused) plus the control options.

  Attributes:
    conditioning_channels: channels of the control image (3: RGB).
    conditioning_embedding_out_channels: channels of the control-image embedding's levels; the embedding
      downsamples by ``2 ** (len - 1)`` (SD: (16, 32, 96, 256), 8: pixels -> latents).
    global_pool_conditions: average every residual over space (shuffle / tile ControlNets of SD 1.1);
      the residuals are (B, 1, 1, C) and broadcast over the U-Net's features.
    controlnet_conditioning_channel_order: 'rgb', or 'bgr' (the control image's channels are reversed
      before the embedding).
  """

  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  global_pool_conditions: bool = False
  controlnet_conditioning_channel_order: str = 'rgb'

  def __post_init__(self):
    super().__post_init__()
    if self.controlnet_conditioning_channel_order not in ('rgb', 'bgr'):
      raise ValueError(f"controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                       f'{self.controlnet_conditioning_channel_order!r}')
    if not self.conditioning_embedding_out_channels:
      raise ValueError('conditioning_embedding_out_channels needs at least one entry')

  @classmethod
  def from_unet(cls, unet: UNetConfig, **control: Any) -> ControlNetConfig:
    """The ControlNet of a U-Net's architecture (``control``: the fields above). Dropout is off, as in
    diffusers' ``ControlNetModel``, which has none."""
    fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
    return cls(**{**fields, 'dropout': 0.0, **control})

  @property
  def embedding_downsampling(self) -> int:
    """Pixels of the control image per latent pixel: ``2 ** (len(conditioning_embedding_out_channels) - 1)``."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  def num_down_residuals(self) -> int:
    """Residuals for the U-Net's skips: ``conv_in``, then per level ``layers_per_block`` (+ 1 downsampler)."""
    levels = len(self.block_out_channels)
    return 1 + levels * self.layers_per_block + levels - 1


CONTROLNET_CONFIGS: dict[str, ControlNetConfig] = {
    # for tests: the tiny U-Net's encoder, control images at 2x the latent size
    'tiny': ControlNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                             num_heads=2, cross_attention_dim=32, norm_num_groups=8,
                             conditioning_embedding_out_channels=(8, 16)),
    'sd15': ControlNetConfig(),
    'sd21': ControlNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
}


def zero_conv(features: int, kernel: int = 1, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
  """``nn.Conv`` (torch padding ``kernel // 2``) with zero kernel and bias, the logical axes of ``layers.conv``."""
  zeros = nn.initializers.zeros_init()
  return nn.Conv(features, (kernel, kernel), padding=((kernel // 2, kernel // 2),) * 2, dtype=dtype,
                 param_dtype=param_dtype, kernel_init=nn.with_logical_partitioning(zeros, CONV_KERNEL_AXES),
                 bias_init=nn.with_logical_partitioning(zeros, BIAS_AXES), name=name)


class ConditioningEmbedding(nn.Module):
  """Control image (B, f H, f W, C_cond) -> (B, H, W, features), f = 2 ** (len(channels) - 1).

  3x3 convolutions with SiLU: ``conv_in`` to ``channels[0]``, then for each next level a pair
  (``blocks_{2i}`` keeping the width, ``blocks_{2i+1}`` strided 2 to ``channels[i + 1]``), and a
  zero-initialised ``conv_out`` to ``features`` (no activation after it).
  """

  features: int
  channels: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(conv(self.channels[0], 3, name='conv_in', **kw)(x))
    for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:], strict=True)):
      h = nn.silu(conv(c_in, 3, name=f'blocks_{2 * i}', **kw)(h))
      h = nn.silu(conv(c_out, 3, stride=2, name=f'blocks_{2 * i + 1}', **kw)(h))
    return zero_conv(self.features, 3, name='conv_out', **kw)(h)


class ControlNet(UNetEncoder, nn.Module):
  """ControlNet: the residuals a U-Net adds to its skips and middle output for a control image.

  Attributes:
    config: the architecture (a ``ControlNetConfig``).
    remat, attention_impl, dtype, param_dtype: as ``UNet``'s.

  Its time embedding and encoder are the U-Net's (``unet.UNetEncoder``), with the U-Net's parameter names.
  """

  config: ControlNetConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, context: Array | None, control_image: Array,
               conditioning_scale: float | Array = 1.0, class_labels: Array | None = None, *,
               text_embeds: Array | None = None, time_ids: Array | None = None, guess_mode: bool | Array = False,
               deterministic: bool = True) -> tuple[tuple[Array, ...], Array]:
    """The residuals for the U-Net's skip connections and middle block.

    Args:
      x, t, context, class_labels, text_embeds, time_ids, deterministic: the U-Net's inputs (``UNet.__call__``):
        x (B, H, W, in_channels) NHWC noisy latents, t (B,) or scalar times, context (B, L, cross_attention_dim).
      control_image: (B, f H, f W, conditioning_channels) in [0, 1] (not normalised), f =
        ``config.embedding_downsampling`` (SD: 8, the control image has the pixel size of the generated image).
      conditioning_scale: a scalar factor on every residual (a float or a traced scalar).
      guess_mode: scale the residuals by ``logspace(-1, 0, n + 1)`` (0.1 for ``conv_in``'s, ..., 1 for the
        middle block's) times ``conditioning_scale``, as diffusers (ignored with ``global_pool_conditions``).
        A Python bool or a traced scalar (one compiled program for both). A pipeline applies it to the
        conditional half of a guided batch only.

    Returns:
      (down_residuals, mid_residual) in ``dtype``: ``config.num_down_residuals()`` arrays, the i-th shaped like
      the U-Net's i-th skip (B, H / 2^l, W / 2^l, block_out_channels[l]) in encoder order, and (B, H / 2^(L-1),
      W / 2^(L-1), block_out_channels[-1]); with ``global_pool_conditions`` each is (B, 1, 1, C).
    """
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _check_control_image(c, x.shape, control_image.shape)
    if c.controlnet_conditioning_channel_order == 'bgr':
      control_image = control_image[..., ::-1]
    if context is not None:
      context = context.astype(self.dtype)
    temb = self._time_embedding(t, class_labels, text_embeds, time_ids, x.shape[0])

    h = conv(c.block_out_channels[0], 3, name='conv_in', **kw)(x.astype(self.dtype))
    h = h + ConditioningEmbedding(c.block_out_channels[0], tuple(c.conditioning_embedding_out_channels),
                                  name='controlnet_cond_embedding', **kw)(control_image.astype(self.dtype))
    skips, h = self._encoder(h, temb, context, deterministic)
    down = tuple(zero_conv(s.shape[-1], name=f'controlnet_down_blocks_{i}', **kw)(s) for i, s in enumerate(skips))
    mid = zero_conv(h.shape[-1], name='controlnet_mid_block', **kw)(h)
    return _scale_residuals(c, down, mid, conditioning_scale, guess_mode)


def _check_control_image(c: ControlNetConfig, x_shape: tuple[int, ...], shape: tuple[int, ...]):
  """ValueError unless the control image is (B, f H, f W, conditioning_channels) for latents (B, H, W, C)."""
  f = c.embedding_downsampling
  want = (x_shape[0], f * x_shape[1], f * x_shape[2], c.conditioning_channels)
  if tuple(shape) != want:
    raise ValueError(f'control_image has shape {tuple(shape)}; for inputs x {tuple(x_shape)} this ControlNet '
                     f'expects {want} (NHWC, {f}x the spatial size of x, {c.conditioning_channels} channels)')


def guess_mode_scales(n: int) -> np.ndarray:
  """diffusers' guess-mode factors ``logspace(-1, 0, n)`` (0.1 ... 1, log-spaced), float32 (n,)."""
  return (10.0 ** np.linspace(-1.0, 0.0, n)).astype(np.float32)


def _scale_residuals(c: ControlNetConfig, down, mid, conditioning_scale, guess_mode):
  """Residuals times ``conditioning_scale`` and the guess-mode factors (1 when off; x 1 is exact), then the optional
  global pool (B, 1, 1, C)."""
  s = jnp.asarray(conditioning_scale, jnp.float32)
  outs = (*down, mid)
  factors = jnp.ones(len(outs), jnp.float32)
  if not c.global_pool_conditions:
    factors = jnp.where(jnp.asarray(guess_mode, bool), guess_mode_scales(len(outs)), factors)
  outs = tuple(r * (s * g).astype(r.dtype) for r, g in zip(outs, factors, strict=True))
  if c.global_pool_conditions:
    outs = tuple(jnp.mean(r, axis=(1, 2), keepdims=True) for r in outs)
  return outs[:-1], outs[-1]


def init_controlnet(net: ControlNet, key: Array, size: int = 8, context_len: int = 8) -> dict:
  """Initialises ``net`` (jitted) on dummy inputs (batch 1, size x size latents); returns the (boxed) params."""
  c = net.config
  (x, t, ctx, labels), added = dummy_inputs(c, size, context_len)
  f = c.embedding_downsampling
  hint = jnp.zeros((1, f * size, f * size, c.conditioning_channels))
  return jax.jit(net.init)(key, x, t, ctx, hint, 1.0, labels, **added)['params']


def _is_shared(path: tuple[str, ...]) -> bool:
  return SHARED_WITH_UNET.fullmatch(path[0]) is not None


def _embedding_params(config: ControlNetConfig, key: Array, param_dtype: Dtype) -> dict:
  """Fresh ``controlnet_cond_embedding`` parameters (``conv_out`` zero), from a one-latent-pixel dummy image."""
  f = config.embedding_downsampling
  embedding = ConditioningEmbedding(config.block_out_channels[0], tuple(config.conditioning_embedding_out_channels),
                                    param_dtype=param_dtype)
  return nn.meta.unbox(jax.jit(embedding.init)(key, jnp.zeros((1, f, f, config.conditioning_channels)))['params'])


def from_unet(unet_params: Mapping, config: ControlNetConfig, *, key: Array, param_dtype: Dtype = jnp.float32
              ) -> dict:
  """A ControlNet initialised from a U-Net, as diffusers' ``ControlNetModel.from_unet``.

  Args:
    unet_params: the U-Net's parameters (boxed or not), of the architecture ``config`` was built from
      (``ControlNetConfig.from_unet(unet.config, ...)``).
    config: the ControlNet's architecture.
    key: initialises the control-image embedding (its ``conv_out`` is zero).
    param_dtype: of the new parameters (the copied ones keep the U-Net's dtype).

  Returns:
    The ControlNet's parameters (plain arrays): ``conv_in``, ``time_embedding``, ``class_embedding``,
    ``add_embedding``, ``down_blocks_*`` and ``mid_block`` copied from the U-Net; every ``controlnet_down_blocks_*``
    and ``controlnet_mid_block`` zero, so that the ControlNet starts as a no-op on the U-Net. Nothing is
    computed but the small control-image embedding's initialisation.

  Raises:
    ValueError: the U-Net's parameters do not fit the configuration (lists the paths).
  """
  net = ControlNet(config, param_dtype=param_dtype)
  shapes = traverse_util.flatten_dict(nn.meta.unbox(jax.eval_shape(lambda: init_controlnet(net, key))))
  unet = traverse_util.flatten_dict(nn.meta.unbox(dict(unet_params)))
  bad = [f'{"/".join(path)}: ControlNet {tuple(leaf.shape)}, '
         f'{"missing" if path not in unet else f"U-Net {tuple(unet[path].shape)}"}'
         for path, leaf in shapes.items() if _is_shared(path) and (path not in unet or unet[path].shape != leaf.shape)]
  if bad:
    raise ValueError('the U-Net parameters do not fit this ControlNetConfig (was it built with '
                     'ControlNetConfig.from_unet of the same U-Net config?):\n  ' + '\n  '.join(bad))
  embedding = traverse_util.flatten_dict(_embedding_params(config, key, param_dtype))
  out = {}
  for path, leaf in shapes.items():
    if path[0] == 'controlnet_cond_embedding':
      out[path] = embedding[path[1:]]
    elif _is_shared(path):
      out[path] = jnp.asarray(unet[path])
    else:  # the zero convolutions
      out[path] = jnp.zeros(leaf.shape, leaf.dtype)
  return traverse_util.unflatten_dict(out)
