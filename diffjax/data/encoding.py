"""Helpers shared by the TFDS builders."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_file(image: np.ndarray) -> io.BytesIO:
  """uint8 (H, W) or (H, W, C) array -> an in-memory PNG file.

  TFDS encodes an Image feature given as a file object without TensorFlow.
  """
  image = np.asarray(image, np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(buf, format="PNG")
  buf.seek(0)
  return buf
