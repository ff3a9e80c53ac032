"""A small CNN classifier for the 8x8 digits: prompt accuracy of generated digits, and an embedding.

The classifier is the params pytree of ``DigitCNN`` (the architecture is fixed), from
``train_digit_classifier`` (a few seconds on a CPU) or ``load_digit_classifier``.
Images are float in [-1, 1] of shape (B, H, W, 1), H = W the pipeline's resolution
(8, 16, ...); the network resizes them to ``INTERNAL_SIZE`` itself, so one classifier
architecture serves every resolution, but train it at the resolution it will judge
(``image_size``): it then sees the pipeline's own bilinear resize of the real digits.

  params, accuracy = train_digit_classifier(data_dir, image_size=16, seed=0)
  prompt_accuracy(params, samples, labels)       # fraction drawn as the prompted digit
  features(params, samples)                      # (N, FEATURES) embedding (evaluate.features)
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

from diffjax.data import pipeline
from diffjax.evaluate.batching import apply_in_batches

INTERNAL_SIZE = 16
NUM_CLASSES = 10
FEATURES = 64
_EVAL_BATCH = 256


class DigitCNN(nn.Module):
  """(B, H, W, 1) float in [-1, 1] -> (logits (B, 10), features (B, FEATURES)): two conv blocks, one hidden layer."""

  @nn.compact
  def __call__(self, x):
    x = jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0)
    if x.shape[1:3] != (INTERNAL_SIZE, INTERNAL_SIZE):
      x = jax.image.resize(x, (x.shape[0], INTERNAL_SIZE, INTERNAL_SIZE, x.shape[3]), "linear")
    for width in (32, 64):
      x = nn.avg_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), (2, 2))
    features = nn.relu(nn.Dense(FEATURES)(x.reshape(x.shape[0], -1)))
    return nn.Dense(NUM_CLASSES)(features), features


def _check_images(images) -> jax.Array:
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2] or not len(images):
    raise ValueError(f"need digit images of shape (N >= 1, S, S, 1) in [-1, 1], got {images.shape}")
  return images


@jax.jit
def _apply(params, images):
  return DigitCNN().apply(params, images)


def _batched(params, images) -> tuple[np.ndarray, np.ndarray]:
  """DigitCNN outputs (logits, features) in batches of one fixed size: one compilation per resolution."""
  return apply_in_batches(lambda x: _apply(params, x), _check_images(images), _EVAL_BATCH)


def logits(classifier, images) -> np.ndarray:
  """Class logits (N, 10) of images (N, S, S, 1) in [-1, 1]."""
  return _batched(classifier, images)[0]


def features(classifier, images) -> np.ndarray:
  """Penultimate-layer embedding (N, FEATURES) (post-ReLU) of images (N, S, S, 1) in [-1, 1]."""
  return _batched(classifier, images)[1]


def prompt_accuracy(classifier, images, labels) -> float:
  """Fraction of ``images`` (N, S, S, 1) in [-1, 1] classified as ``labels`` (N,) 0-9 (the digits prompted)."""
  labels = np.asarray(labels)
  if labels.shape != (len(images),):
    raise ValueError(f"need one label per image: {len(images)} images, labels of shape {labels.shape}")
  return float(np.mean(logits(classifier, images).argmax(-1) == labels))


def real_digits(data_dir: str | None, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """A whole ``digits_captions`` split as the pipeline serves it at ``image_size`` S.

  Returns images (N, S, S, 1) float32 in [-1, 1] and labels (N,) int32 0-9.
  """
  source = pipeline.load_source("digits_captions", split, data_dir)
  options = pipeline.ImageTextOptions(batch_size=len(source), image_size=image_size, extra_keys=("label",))
  batch = next(iter(pipeline.image_text_dataset(source, options, lambda caption: np.zeros(1, np.int32), seed=0,
                                                num_epochs=1, shuffle=False)))
  return batch["image"], batch["label"]


def train_digit_classifier(data_dir: str | None, *, image_size: int, seed: int, epochs: int = 20,
                           batch_size: int = 64, learning_rate: float = 3e-3) -> tuple[dict, float]:
  """Trains ``DigitCNN`` on the ``train`` split at ``image_size``; returns (params, accuracy on ``test``).

  Adam with a cosine-decayed learning rate; every epoch a fresh permutation from ``seed``.
  """
  start = time.time()
  images, labels = real_digits(data_dir, "train", image_size)
  init_key, shuffle_key = jax.random.split(jax.random.key(seed))
  params = DigitCNN().init(init_key, images[:1])
  steps_per_epoch = len(images) // batch_size
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss = lambda params: optax.softmax_cross_entropy_with_integer_labels(DigitCNN().apply(params, x)[0], y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A Python loop: on XLA:CPU convolutions inside lax.scan run ~40x slower than jitted steps.
  for key in jax.random.split(shuffle_key, epochs):
    order = np.asarray(jax.random.permutation(key, len(images)))
    for i in range(steps_per_epoch):
      batch = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state = step(params, opt_state, images[batch], labels[batch])
  params = jax.device_get(params)
  accuracy = prompt_accuracy(params, *real_digits(data_dir, "test", image_size))
  logging.info("digit classifier at %dx%d: test accuracy %.4f after %.1f s", image_size, image_size, accuracy,
               time.time() - start)
  return params, accuracy


def save_digit_classifier(path: str, params, test_accuracy: float, image_size: int) -> None:
  """Writes params and their provenance to an .npz file."""
  flat = {f"params/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # an open file: np.savez would append ".npz" to a path without it
    np.savez(f, test_accuracy=test_accuracy, image_size=image_size, **flat)


def load_digit_classifier(path: str) -> tuple[dict, float, int]:
  """(params, test_accuracy, image_size) saved by ``save_digit_classifier``; checks the params fit ``DigitCNN``."""
  with np.load(path) as data:
    flat = {k.removeprefix("params/"): data[k] for k in data.files if k.startswith("params/")}
    accuracy, image_size = float(data["test_accuracy"]), int(data["image_size"])
  params = traverse_util.unflatten_dict(flat, sep="/")
  expected = jax.eval_shape(DigitCNN().init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 1)))
  shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
  if shapes(params) != shapes(expected):
    raise ValueError(f"{path} does not hold params of this DigitCNN (an older version?): delete it to retrain")
  return params, accuracy, image_size


def cached_digit_classifier(path: str, data_dir: str | None, *, image_size: int, seed: int) -> tuple[dict, float]:
  """(params, test accuracy) from ``path`` if it holds a classifier for ``image_size``; else trains and saves one."""
  if os.path.exists(path):
    try:
      params, accuracy, saved_size = load_digit_classifier(path)
    except ValueError as e:
      logging.warning("retraining: %s", e)
    else:
      if saved_size == image_size:
        logging.info("digit classifier from %s (test accuracy %.4f)", path, accuracy)
        return params, accuracy
  params, accuracy = train_digit_classifier(data_dir, image_size=image_size, seed=seed)
  save_digit_classifier(path, params, accuracy, image_size)
  return params, accuracy
