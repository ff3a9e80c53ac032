"""Running a network over a whole image set in batches of one fixed size (one compilation per image shape)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np


def apply_in_batches(fn: Callable, images, batch_size: int):
  """``fn(batch)`` over ``images`` (N, ...) in batches of ``batch_size`` (the last one zero-padded), outputs
  (a pytree of (batch, ...) arrays) concatenated to N rows as numpy arrays."""
  images = np.asarray(images)
  n = len(images)
  padded = np.concatenate([images, np.zeros((-n % batch_size,) + images.shape[1:], images.dtype)])
  outs = [jax.device_get(fn(padded[i:i + batch_size])) for i in range(0, len(padded), batch_size)]
  return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *outs)
