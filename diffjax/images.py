"""Image helpers: float <-> uint8, grids, PNG files (pillow)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


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


def save_labeled_grid(images: np.ndarray, labels, path: str, min_width: int = 512) -> np.ndarray:
  """Writes (N, H, W, C) uint8 images as a PNG grid with one row per label, the label printed on the left.

  ``N`` must be a multiple of ``len(labels)`` (prompt-major: row r holds images
  r * N / rows ... (r + 1) * N / rows - 1). The image part is upscaled (nearest) to at
  least ``min_width`` pixels. Returns the written (H', W', 3) uint8 image.
  """
  from PIL import ImageDraw, ImageFont

  labels = [str(s) for s in labels]
  if not labels or len(images) % len(labels):
    raise ValueError(f"{len(images)} images do not split into {len(labels)} labelled rows")
  g = grid(images, rows=len(labels))
  scale = max(1, -(-min_width // g.shape[1]))
  pil = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).convert("RGB")
  pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  font = ImageFont.load_default()
  row_h = pil.height / len(labels)
  text_w = max(int(ImageDraw.Draw(pil).textlength(s, font=font)) for s in labels) + 12
  out = Image.new("RGB", (pil.width + text_w, pil.height), (255, 255, 255))
  out.paste(pil, (text_w, 0))
  draw = ImageDraw.Draw(out)
  for r, s in enumerate(labels):
    draw.text((6, int((r + 0.5) * row_h) - 6), s, fill=(0, 0, 0), font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  out.save(path)
  return np.asarray(out)


MODES = {3: ("RGB",), 1: ("L", "1")}  # what a colour image / a mask file may hold


def load_image(path: str, channels: int = 3) -> np.ndarray:
  """float32 (H, W, channels) in [0, 1] of an image file: an RGB image (``channels=3``) or a grey mask (1).

  ValueError naming the file for a missing or unreadable file or another mode (RGBA,
  palette, CMYK ...: convert it first, so nothing is guessed about alpha or colour).
  """
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such image file")
  try:
    with Image.open(path) as pil:
      pil.load()
  except (OSError, SyntaxError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None
  if pil.mode not in MODES[channels]:
    raise ValueError(f"{path}: image mode {pil.mode}, expected {' or '.join(MODES[channels])} "
                     f"({'a colour image' if channels == 3 else 'a grey mask'}): convert it first")
  x = np.asarray(pil.convert("L") if pil.mode == "1" else pil, np.float32) / 255.0
  return x.reshape(x.shape[:2] + (channels,))
