"""The FID Inception-v3 (Szegedy et al. 2016, as TensorFlow's FID graph runs it) in linen, NHWC, inference only.

The network of Heusel et al.'s FID: Inception-v3 with the 2015-12-05 weights, which differ
from the common Inception-v3 in three places (what pytorch-fid's ``fid_inception_v3``
reproduces and ``load_fid_inception`` reads):

* the average-pooling branch of the A, C and first E blocks excludes the zero padding from
  its mean (``count_include_pad=False``), and the last E block max-pools in that branch;
* 1008 output classes (unused here: FID reads the 2048-d pooled features);
* every convolution is bias-free and followed by a BatchNorm with eps 1e-3 (running
  statistics, as in inference).

``FIDInception()(images)`` takes images (B, H, W, 3) in [0, 1] (pytorch-fid's input range),
resizes them bilinearly to 299 x 299 without antialiasing (``align_corners=False``, what
``torch.nn.functional.interpolate`` does; clean-fid's point is that this resize, and any
uint8 quantization before it, change FID: feed float images at their own resolution and
state the convention), maps them to [-1, 1], and returns the (B, 2048) mean of the last
block's features.

Parameter names follow the PyTorch state dict (``Mixed_5b.branch1x1.conv.weight`` ->
``Mixed_5b / branch1x1 / conv / kernel``; ``bn.weight/bias/running_mean/running_var`` ->
``bn / scale, bias, mean, var``), so ``diffjax.convert.keys`` maps them by name.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3


class BatchNorm(nn.Module):
  """Inference BatchNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias."""

  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale, bias = self.param("scale", nn.initializers.ones, (c,)), self.param("bias", nn.initializers.zeros, (c,))
    mean, var = self.param("mean", nn.initializers.zeros, (c,)), self.param("var", nn.initializers.ones, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class ConvBN(nn.Module):
  """Bias-free convolution, BatchNorm, ReLU (torchvision's ``BasicConv2d``); padding in pixels per side."""

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    pad = [(p, p) for p in self.padding]
    x = nn.Conv(self.features, self.kernel, (self.stride, self.stride), padding=pad, use_bias=False, name="conv")(x)
    return nn.relu(BatchNorm(name="bn")(x))


def _avg_pool_excluding_padding(x):
  """3x3 stride-1 mean over the window's pixels inside the image (``count_include_pad=False``)."""
  pad = ((1, 1), (1, 1))
  total = nn.pool(x, 0.0, jax.lax.add, (3, 3), (1, 1), pad)
  count = nn.pool(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, (3, 3), (1, 1), pad)
  return total / count


def _max_pool_3x3(x, stride: int, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class BlockA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(ConvBN(48, (1, 1), name="branch5x5_1")(x))
    b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(
        ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3))
    bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_excluding_padding(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
  """The 35 -> 17 grid reduction (``Mixed_6a``)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), stride=2, name="branch3x3")(x)
    d = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(ConvBN(64, (1, 1), name="branch3x3dbl_1")(x))
    d = ConvBN(96, (3, 3), stride=2, name="branch3x3dbl_3")(d)
    return jnp.concatenate([b3, d, _max_pool_3x3(x, 2)], axis=-1)


class BlockC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = ConvBN(c, (1, 1), name="branch7x7_1")(x)
    b7 = ConvBN(192, **col, name="branch7x7_3")(ConvBN(c, **row, name="branch7x7_2")(b7))
    d = ConvBN(c, (1, 1), name="branch7x7dbl_1")(x)
    for i, (width, shape) in enumerate([(c, col), (c, row), (c, col), (192, row)], start=2):
      d = ConvBN(width, **shape, name=f"branch7x7dbl_{i}")(d)
    bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_excluding_padding(x))
    return jnp.concatenate([b1, b7, d, bp], axis=-1)


class BlockD(nn.Module):
  """The 17 -> 8 grid reduction (``Mixed_7a``)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(320, (3, 3), stride=2, name="branch3x3_2")(ConvBN(192, (1, 1), name="branch3x3_1")(x))
    b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class BlockE(nn.Module):
  """The 8x8 blocks; ``max_pool``: the pooling branch max-pools (the FID graph's last block) instead of averaging."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    split = lambda y, prefix: jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y),
                                               ConvBN(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)], axis=-1)
    b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = split(ConvBN(384, (1, 1), name="branch3x3_1")(x), "branch3x3_2")
    d = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(ConvBN(448, (1, 1), name="branch3x3dbl_1")(x))
    d = split(d, "branch3x3dbl_3")
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_excluding_padding(x)
    bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, d, bp], axis=-1)


def resize_bilinear(images: Array, size: int) -> Array:
  """(B, H, W, C) -> (B, size, size, C), bilinear with half-pixel centres and no antialiasing
  (``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``, also when shrinking)."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  scale = jnp.array([size / h, size / w])
  return jax.image.scale_and_translate(images, (b, size, size, c), (1, 2), scale, jnp.zeros(2), "linear",
                                       antialias=False)


class FIDInception(nn.Module):
  """images (B, H, W, 3) in [0, 1] -> pool3 features (B, 2048) of the FID Inception (module docstring)."""

  @nn.compact
  def __call__(self, images):
    x = resize_bilinear(jnp.asarray(images, jnp.float32), SIZE) * 2.0 - 1.0
    x = ConvBN(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = _max_pool_3x3(ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x), 2)
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = _max_pool_3x3(ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x), 2)
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = BlockA(pool, name=name)(x)
    x = BlockB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = BlockC(c7, name=name)(x)
    x = BlockD(name="Mixed_7a")(x)
    x = BlockE(name="Mixed_7b")(x)
    x = BlockE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))
