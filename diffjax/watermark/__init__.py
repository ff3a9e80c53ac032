"""Provenance marks on generated images.

Two marks, both on by default in every pipeline output (``DEFAULT``; ``NONE`` turns them off):

* a pixel mark (``dwt_dct``): invisible-watermark's dwtDct, bit-compatible with the package (its
  ``WatermarkDecoder`` reads diffjax's marks and the reverse), carrying ``pixel_bits`` (default the
  48-bit constant diffusers' SDXL pipeline writes, which existing detectors look for). It needs
  RGB images of at least 256 x 256 pixels and survives little editing (JPEG without chroma
  subsampling; not resizing): ``benchmarks/watermark.py`` measures it.
* a latent mark (``latent``): the key's low-frequency pattern written into the initial noise of
  txt2img, found again by inverting the image to its noise; an exact p-value over the key's draw.

``Watermark.mark_noise`` and ``Watermark.mark_images`` are what the pipelines call;
``diffjax.detection`` reads images and reports both marks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

from diffjax.watermark import dwt_dct, latent
from diffjax.watermark.latent import LatentKey

DEFAULT_LATENT_SEED = 20261206  # the public default key: marks "made with diffjax"; set your own to keep it secret


@dataclasses.dataclass(frozen=True)
class Watermark:
  """pixel_bits: the dwtDct payload (0/1 tuple; None: no pixel mark); latent: the latent mark's key (None: none)."""

  pixel_bits: tuple[int, ...] | None = tuple(int(b) for b in dwt_dct.SDXL_BITS)
  latent: LatentKey | None = LatentKey(seed=DEFAULT_LATENT_SEED)

  def mark_noise(self, noise, drawn: bool) -> tuple[np.ndarray, dict | None]:
    """noise (B, h, w, c) standard normal -> (marked noise, the latent mark's record or None).

    Only noise the pipeline drew itself is marked: noise a caller passes in is used as given
    (to reproduce another library's images), and the record says so.
    """
    if self.latent is None:
      return noise, None
    try:
      record = self.latent.record(np.shape(noise)[1:])
    except ValueError as e:  # a latent too small to carry a detectable mark
      return noise, {"scheme": latent.NAME, "applied": False, "reason": str(e)}
    if not drawn:
      return noise, record | {"applied": False, "reason": "the initial noise was given by the caller"}
    return latent.mark_noise(noise, self.latent), record | {"applied": True}

  def mark_images(self, images: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """images (B, H, W, C) float in [0, 1] -> (pixel-marked images on the uint8 grid, the pixel mark's record).

    Images the scheme cannot carry (not RGB, or under ``dwt_dct.MIN_SIZE`` on a side) are returned
    unchanged and the record says why.
    """
    if self.pixel_bits is None:
      return images, None
    record = pixel_record(self.pixel_bits)
    reason = pixel_unsupported(images.shape[1:])
    if reason:
      return images, record | {"applied": False, "reason": reason}
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    marked = dwt_dct.encode(pixels, np.asarray(self.pixel_bits, np.uint8))
    return marked.astype(np.float32) / 255.0, record | {"applied": True}

  def record(self) -> dict:
    return {"pixel": None if self.pixel_bits is None else pixel_record(self.pixel_bits),
            "latent": None if self.latent is None else dataclasses.asdict(self.latent)}


DEFAULT = Watermark()
NONE = Watermark(pixel_bits=None, latent=None)


def pixel_record(bits) -> dict:
  bits = np.asarray(bits, np.uint8)
  return {"scheme": "dwtDct", "bits": "".join(str(int(b)) for b in bits), "scale": dwt_dct.SCALE}


def pixel_unsupported(shape) -> str:
  """Why images of ``shape`` (H, W, C) cannot carry the pixel mark ("" if they can)."""
  h, w, c = shape
  if c != 3:
    return f"the pixel mark needs RGB images, these have {c} channel(s)"
  if min(h, w) < dwt_dct.MIN_SIZE:
    return f"the pixel mark needs images of at least {dwt_dct.MIN_SIZE} x {dwt_dct.MIN_SIZE}, these are {h} x {w}"
  return ""


def pixel_p_value(matches: int, num_bits: int) -> float:
  """P(at least ``matches`` of ``num_bits`` payload bits read right | no mark), bits read as fair coins."""
  return float(stats.binom.sf(matches - 1, num_bits, 0.5))


KINDS = ("pixel+latent", "pixel", "latent", "none")  # what config.watermark may say


def from_config(kind: str, seed: int, radius: float = 0.0) -> Watermark:
  """``config.watermark`` (one of ``KINDS``), ``config.watermark_seed`` and ``config.watermark_radius`` (the
  latent key's radius in frequency units; 0: ``latent.default_radius``) -> Watermark."""
  if kind not in KINDS:
    raise ValueError(f"watermark must be one of {KINDS}, got {kind!r}")
  return Watermark(pixel_bits=DEFAULT.pixel_bits if "pixel" in kind else None,
                   latent=LatentKey(seed=int(seed), radius=float(radius) or None) if "latent" in kind else None)


__all__ = ["DEFAULT", "KINDS", "NONE", "LatentKey", "Watermark", "dwt_dct", "from_config", "latent", "pixel_p_value",
           "pixel_unsupported"]
