"""A feature network for the embedded data sets, trained contrastively on the real training split.

SimCLR (Chen et al. 2020): two random views of every image of a batch, NT-Xent loss at
temperature ``TAU`` on a projection head, features = the encoder's output before the head.
The views differ only by where the image sits (whole-pixel shifts of up to an eighth of
its side, edges replicated): the features become invariant to where a digit or shape sits,
and are not taught to ignore noise, blur, shuffled pixels or saturation, which are what a
sample metric must see (``sanity``). ``train`` takes a minute or two on a CPU.

  params = cached_encoder(path, images, seed=0)     # images (N, H, W, C) in [-1, 1]
  feats = features(params, images)                  # (N, FEATURES)
"""

from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from diffjax.evaluate.batching import apply_in_batches

FEATURES = 128
TAU = 0.2
STEPS = 800  # training steps by default
_BATCH = 256


class Encoder(nn.Module):
  """(B, H, W, C) in [-1, 1] -> (features (B, FEATURES), projection (B, 64)): three conv blocks, mean pool."""

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    for width in (32, 64, 128):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.avg_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), (2, 2)) if x.shape[1] >= 4 else x
    feats = nn.Dense(FEATURES)(jnp.mean(x, axis=(1, 2)))
    return feats, nn.Dense(64)(nn.relu(nn.Dense(FEATURES)(feats)))


def augment(key, images):
  """A random view of each image: an integer shift by up to ``max_shift(H)`` pixels each way, edges replicated.

  Whole-pixel moves only: a sub-pixel shift or a rotation resamples (blurs) the image, and the
  features would learn to ignore blur, which a sample metric must see.
  """
  b, h, w, _ = images.shape
  s = max_shift(h)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * s + 1)
  padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def max_shift(size: int) -> int:
  """The largest shift of a view: an eighth of the image side, at least one pixel."""
  return max(1, size // 8)


def nt_xent(z1, z2, tau: float = TAU):
  """SimCLR's loss of two views (B, d) each: cross-entropy of each view's pair among the other 2B - 1."""
  z = jnp.concatenate([z1, z2])
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  logits = z @ z.T / tau
  n = z.shape[0]
  logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)
  partner = (jnp.arange(n) + n // 2) % n
  return optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()


def train(images, *, seed: int, steps: int = STEPS, batch_size: int = _BATCH, learning_rate: float = 1e-3) -> dict:
  """Encoder params trained on ``images`` (N, H, W, C) in [-1, 1] (the real training split only)."""
  start = time.time()
  images = jnp.asarray(images, jnp.float32)
  key, init_key = jax.random.split(jax.random.key(seed))
  params = Encoder().init(init_key, images[:1])
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    k_batch, k1, k2 = jax.random.split(key, 3)
    x = images[jax.random.choice(k_batch, len(images), (min(batch_size, len(images)),), replace=False)]
    v1, v2 = augment(k1, x), augment(k2, x)
    loss_fn = lambda p: nt_xent(Encoder().apply(p, v1)[1], Encoder().apply(p, v2)[1])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # A Python loop: on XLA:CPU convolutions inside lax.scan run far slower than jitted steps.
  for i, k in enumerate(jax.random.split(key, steps)):
    params, opt_state, loss = step(params, opt_state, k)
    if i % 200 == 0 or i == steps - 1:
      logging.info("contrastive encoder step %d/%d: loss %.4f", i + 1, steps, float(loss))
  logging.info("contrastive encoder trained in %.1f s", time.time() - start)
  return jax.device_get(params)


@jax.jit
def _apply(params, images):
  return Encoder().apply(params, images)[0]


def features(params, images) -> np.ndarray:
  """(N, FEATURES) float64 encoder features of images (N, H, W, C) in [-1, 1], in fixed-size batches."""
  return apply_in_batches(lambda x: _apply(params, x), np.asarray(images, np.float32), _BATCH).astype(np.float64)


def save(path: str, params, shape: tuple) -> None:
  flat = {f"params/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, image_shape=np.asarray(shape), **flat)


def load_encoder(path: str) -> tuple[dict, tuple]:
  """(params, image shape (H, W, C) they were trained on) saved by ``save``."""
  with np.load(path) as data:
    params = traverse_util.unflatten_dict({k.removeprefix("params/"): data[k] for k in data.files
                                           if k.startswith("params/")}, sep="/")
    return params, tuple(int(v) for v in data["image_shape"])


def cached_encoder(path: str, images, *, seed: int, steps: int = STEPS) -> dict:
  """Encoder params from ``path`` if it holds an encoder for images of this shape, else trained (``steps``), saved."""
  shape = tuple(np.shape(images)[1:])
  if os.path.exists(path):
    params, saved = load_encoder(path)
    if saved == shape:
      return params
  params = train(images, seed=seed, steps=steps)
  save(path, params, shape)
  return params
