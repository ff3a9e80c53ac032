"""Image helpers: float <-> uint8, grids, PNG files (pillow)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(x, low: float = -1.0, high: float = 1.0) -> np.ndarray:
  """Float images in [low, high] -> uint8 in [0, 255] (clipped, rounded)."""
  x = (np.asarray(x, np.float64) - low) / (high - low)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, row-major."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
  return out


def save_png(image: np.ndarray, path: str, scale: int = 1) -> None:
  """Writes (H, W, C) uint8 (C = 1 or 3) as PNG, upscaled ``scale`` times (nearest) for small images."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  pil.save(path)


def save_labelled_grid(images: np.ndarray, labels, path: str, height: int = 48) -> None:
  """Writes a PNG with one row of ``images`` (N, H, W, C) uint8 per label, the label written left of its row.

  N must be a multiple of len(labels) (row-major, label-major order); rows are scaled to ``height`` pixels.
  """
  g = grid(images, rows=len(labels))
  scale = max(1, height // images.shape[1])
  pil = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).convert("RGB")
  pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(pil)
  text_width = int(max(draw.textlength(str(label)) for label in labels)) + 8
  canvas = Image.new("RGB", (pil.width + text_width, pil.height), (255, 255, 255))
  canvas.paste(pil, (text_width, 0))
  draw = ImageDraw.Draw(canvas)
  row = pil.height / len(labels)
  for r, label in enumerate(labels):
    draw.text((4, int((r + 0.5) * row) - 5), str(label), fill=(0, 0, 0))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)
