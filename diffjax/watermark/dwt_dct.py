"""The "dwtDct" invisible watermark of ``invisible-watermark`` 0.2.0 (``imwatermark``), bit-compatible.

Marks written here decode with ``imwatermark.WatermarkDecoder(...).decode(bgr, "dwtDct")`` and the
reverse. With ``encode(..., package_pixels=True)`` the pixels equal the package's output (same fixed-point
colour conversion, same float64 Haar arithmetic and the same truncation to uint8); by default only the
mark's own change is written (see ``encode``). The algorithm, as the package runs it:

1. BGR -> YUV with OpenCV's 8-bit BT.601 conversion (14-bit fixed point, rounded, saturated).
2. Only the U channel is marked: the package loops over channels 0 and 1 with scales ``[0, 36, 36]``,
   so Y (scale 0) is skipped and V is never reached. The top-left ``(H // 4 * 4, W // 4 * 4)`` crop of U
   goes through a one-level Haar DWT (pywt ``'haar'``); its LL band is cut into 4x4 blocks, row-major,
   and block ``k`` carries payload bit ``k % len(bits)`` (LL rows/columns past the last whole block are
   left as they are; so are image rows/columns past the crop).
3. Despite the name no DCT is taken: in each raw LL block the largest-magnitude entry other than the
   top-left one (first on ties) is moved to ``sign * (|v| // s + 0.25 + 0.5 * bit) * s`` (``s`` = 36).
   Decoding reads ``|v| % s > s / 2`` per block, averages the votes of each bit and thresholds at
   ``score * 255 > 127`` (i.e. score > 0.498).
4. The inverse DWT gets the horizontal and vertical detail bands swapped, which transposes every 2x2
   pixel block of U (LL, hence the mark, is unaffected). The float result is cast to uint8 by
   truncation, so even unmarked U pixels may drop one level, then YUV -> BGR (fixed point, saturated).

Images are RGB uint8 ``(H, W, 3)`` or ``(N, H, W, 3)``; the BGR order is handled inside.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_SIZE = 256
"""Minimum height and width in pixels. The package's encoder and decoder refuse images of fewer than
256 * 256 pixels ("image too small"; an area test) and diffusers' SDXL watermarker skips images narrower
than 256. Requiring both sides to reach 256 (stricter) keeps every image marked here readable by the
package and leaves at least 32 * 32 = 1024 blocks, so short payloads get many votes per bit."""

SCALE = 36.0
"""Quantisation step of the marked LL entries (the package's U-channel scale), in LL units (2x pixel levels)."""

SD1_PAYLOAD = b"StableDiffusionV1"  # CompVis stable-diffusion scripts/txt2img.py, 136 bits
SD2_PAYLOAD = b"SDV2"  # Stability-AI stablediffusion scripts/txt2img.py, 32 bits
SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110  # diffusers StableDiffusionXLWatermarker
SDXL_BITS = np.array([int(c) for c in bin(SDXL_MESSAGE)[2:]], np.uint8)  # 48 bits, MSB first (0xB3EC907BB19E)

_BLOCK = 4
_TAP = 0.7071067811865476  # pywt's Haar filter tap (1/sqrt(2) as float64); same op order as pywt -> same bits
_Y = (1868, 9617, 4899)  # OpenCV B2Y, G2Y, R2Y * 2**14
_B2U, _R2V = 8061, 14369  # 0.492, 0.877 * 2**14
_U2B, _U2G, _V2G, _V2R = 33292, -6472, -9519, 18678  # 2.032, -0.395, -0.581, 1.140 * 2**14


@dataclasses.dataclass(frozen=True)
class DecodedBits:
  """Decoded payload: ``bits`` bool and ``scores`` float64 in [0, 1] (the fraction of blocks voting 1 for each
  bit), both ``(N, num_bits)``, or ``(num_bits,)`` for a single image. ``bits = scores * 255 > 127``."""

  bits: np.ndarray
  scores: np.ndarray


def bytes_to_bits(data: bytes) -> np.ndarray:
  """Bytes -> (8 * len(data),) uint8 0/1 bits, most significant bit of each byte first (np.unpackbits)."""
  return np.unpackbits(np.frombuffer(bytes(data), np.uint8))


def bits_to_bytes(bits) -> bytes:
  """(8 * K,) 0/1 or bool bits, MSB first -> K bytes (inverse of ``bytes_to_bits``)."""
  bits = _as_bits(bits)
  if bits.size % 8:
    raise ValueError(f"bits_to_bytes needs a multiple of 8 bits, got {bits.size}")
  return np.packbits(bits).tobytes()


def _as_bits(bits) -> np.ndarray:
  arr = np.asarray(bits)
  if arr.ndim != 1 or arr.size == 0 or not np.isin(arr, (0, 1)).all():
    raise ValueError(f"bits must be a non-empty 1-D array of 0/1 or bool, got shape {arr.shape} dtype {arr.dtype}")
  return arr.astype(np.uint8)


def _as_batch(images) -> tuple[np.ndarray, bool]:
  """RGB uint8 (H, W, 3) or (N, H, W, 3) -> ((N, H, W, 3), was_single); ValueError on anything else."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"watermark images must be uint8 (RGB, 0..255), got dtype {images.dtype}")
  if images.ndim not in (3, 4) or images.shape[-1] != 3:
    raise ValueError(f"watermark images must be RGB shaped (H, W, 3) or (N, H, W, 3), got shape {images.shape}")
  h, w = images.shape[-3:-1]
  if min(h, w) < MIN_SIZE:
    raise ValueError(f"watermark images need height and width >= {MIN_SIZE}, got shape {images.shape}")
  return (images[None], True) if images.ndim == 3 else (images, False)


def _descale(x: np.ndarray) -> np.ndarray:
  """OpenCV CV_DESCALE(x, 14): round-half-up of x / 2**14 (arithmetic shift, i.e. floor for negatives)."""
  return (x + (1 << 13)) >> 14


def _rgb_to_yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(..., 3) uint8 RGB -> Y, U, V int32 (...) in 0..255, as cv2.cvtColor(bgr, COLOR_BGR2YUV) for uint8."""
  r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
  y = _descale(b * _Y[0] + g * _Y[1] + r * _Y[2])
  u = np.clip(_descale((b - y) * _B2U + (128 << 14)), 0, 255)
  v = np.clip(_descale((r - y) * _R2V + (128 << 14)), 0, 255)
  return y, u, v


def _yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Y, U, V int (...) in 0..255 -> (..., 3) uint8 RGB, as cv2.cvtColor(yuv, COLOR_YUV2BGR) for uint8."""
  u, v = u - 128, v - 128
  r = y + _descale(v * _V2R)
  g = y + _descale(u * _U2G + v * _V2G)
  b = y + _descale(u * _U2B)
  return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def _haar(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """pywt.dwt2(x, 'haar') over the last two (even) axes: (..., 2h, 2w) -> LL, H, V, D each (..., h, w)."""
  lo = _TAP * x[..., 1::2, :] + _TAP * x[..., 0::2, :]  # rows first, each output as pywt computes it
  hi = _TAP * x[..., 0::2, :] - _TAP * x[..., 1::2, :]
  ll = _TAP * lo[..., 1::2] + _TAP * lo[..., 0::2]
  det_h = _TAP * hi[..., 1::2] + _TAP * hi[..., 0::2]
  det_v = _TAP * lo[..., 0::2] - _TAP * lo[..., 1::2]
  return ll, det_h, det_v, _TAP * hi[..., 0::2] - _TAP * hi[..., 1::2]


def _inverse_haar(ll, det_h, det_v, det_d) -> np.ndarray:
  """pywt.idwt2((ll, (det_h, det_v, det_d)), 'haar'): four (..., h, w) bands -> (..., 2h, 2w)."""

  def pair(lo, hi):  # (lo + hi, lo - hi) / sqrt(2)
    return _TAP * lo + _TAP * hi, _TAP * lo - _TAP * hi

  lo = np.stack(pair(ll, det_v), -1).reshape(*ll.shape[:-1], -1)  # columns first, as pywt
  hi = np.stack(pair(det_h, det_d), -1).reshape(*ll.shape[:-1], -1)
  return np.stack(pair(lo, hi), -2).reshape(*ll.shape[:-2], -1, lo.shape[-1])


def _blocks(ll: np.ndarray) -> np.ndarray:
  """(N, h, w) LL -> (N, h//4 * w//4, 16) whole 4x4 blocks, row-major over blocks and within each block."""
  n, h, w = ll.shape
  gh, gw = h // _BLOCK, w // _BLOCK
  blocks = ll[:, : gh * _BLOCK, : gw * _BLOCK].reshape(n, gh, _BLOCK, gw, _BLOCK)
  return blocks.transpose(0, 1, 3, 2, 4).reshape(n, gh * gw, _BLOCK * _BLOCK)


def _peak(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, B, 16) -> index (N, B, 1) and value (N, B) of the largest-|.| entry after the first (first on ties)."""
  pos = np.argmax(np.abs(blocks[..., 1:]), axis=-1)[..., None] + 1
  return pos, np.take_along_axis(blocks, pos, -1)[..., 0]


def _u_and_ll(rgb: np.ndarray):
  """(N, H, W, 3) uint8 -> Y, U, V int32 (N, H, W), crop h4, w4, and the Haar bands of U's (h4, w4) crop."""
  y, u, v = _rgb_to_yuv(rgb)
  h4, w4 = (rgb.shape[1] // 4) * 4, (rgb.shape[2] // 4) * 4
  return y, u, v, h4, w4, _haar(u[:, :h4, :w4].astype(np.float64))


def encode(images, bits, scale: float = SCALE, package_pixels: bool = False) -> np.ndarray:
  """Writes ``bits`` into RGB uint8 images (H, W, 3) or (N, H, W, 3), H and W >= MIN_SIZE; same shape out.

  ``bits``: 1-D 0/1 or bool, repeated over the image's 4x4 LL blocks ((H // 8) * (W // 8) of them; at most
  that many bits). ``scale``: quantisation step in LL units (the package's 36).
  ``package_pixels``: the package's exact pixels (every pixel through its YUV round trip, the detail bands
  swapped, U truncated). By default only what the mark needs changes: the LL change spread over its 2x2
  pixel cell (a Haar LL coefficient is half the cell's sum) as a U change at constant Y and V, i.e. on B and
  G by OpenCV's YUV -> BGR coefficients, rounded; other pixels keep their values. Both decode alike (the
  package's decoder reads the same LL), and the default leaves no 2x2 transposition artifacts.
  """
  batch, single = _as_batch(images)
  bits = _as_bits(bits)
  y, u, v, h4, w4, (ll, det_h, det_v, det_d) = _u_and_ll(batch)
  original_ll = ll.copy()
  blocks = _blocks(ll)
  if bits.size > blocks.shape[1]:
    raise ValueError(f"{bits.size} bits do not fit in the {blocks.shape[1]} blocks of images shaped {batch.shape}")
  wanted = bits[np.arange(blocks.shape[1]) % bits.size]  # (B,)
  pos, val = _peak(blocks)
  mag = np.abs(val)  # LL >= 0 as U >= 0, so the sign branch below never fires; kept as the package has it
  new = (mag // scale + 0.25 + 0.5 * wanted) * scale
  np.put_along_axis(blocks, pos, np.where(val >= 0, new, -new)[..., None], -1)
  n, gh, gw = ll.shape[0], ll.shape[1] // _BLOCK, ll.shape[2] // _BLOCK
  ll[:, : gh * _BLOCK, : gw * _BLOCK] = (
    blocks.reshape(n, gh, gw, _BLOCK, _BLOCK).transpose(0, 1, 3, 2, 4).reshape(n, gh * _BLOCK, gw * _BLOCK)
  )
  if not package_pixels:
    delta_u = np.repeat(np.repeat(ll - original_ll, 2, axis=1), 2, axis=2) / 2.0  # (N, h4, w4) U levels
    out = batch.astype(np.float64)
    out[:, :h4, :w4, 2] += delta_u * (_U2B / 2**14)  # B = Y + 2.032 (U - 128); R does not depend on U
    out[:, :h4, :w4, 1] += delta_u * (_U2G / 2**14)  # G = Y - 0.395 (U - 128) - 0.581 (V - 128)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out[0] if single else out
  marked = u.copy()
  recon = _inverse_haar(ll, det_v, det_h, det_d)  # the package passes (V, H, D): bands swapped, as it does
  # it assigns the float result into its uint8 YUV array: truncation. U is 17..239 and an LL step of at most
  # 0.75 * scale = 27 moves pixels by <= 13.5, so the result stays in 3..252: no wrap-around to reproduce.
  marked[:, :h4, :w4] = np.clip(recon, 0, 255).astype(np.int32)
  out = _yuv_to_rgb(y, marked, v)
  return out[0] if single else out


def decode(images, num_bits: int, scale: float = SCALE) -> DecodedBits:
  """Reads a ``num_bits`` payload from RGB uint8 images (H, W, 3) or (N, H, W, 3), H and W >= MIN_SIZE.

  Returns ``DecodedBits`` with ``bits`` (bool) and ``scores`` (fraction of blocks voting 1, float in [0, 1]),
  shaped (N, num_bits), or (num_bits,) for a single image. An unmarked image gives scores spread around
  0.5 and bits that match a payload only by chance.
  """
  batch, single = _as_batch(images)
  *_, (ll, _, _, _) = _u_and_ll(batch)
  blocks = _blocks(ll)
  if not 1 <= num_bits <= blocks.shape[1]:
    raise ValueError(f"num_bits must be in 1..{blocks.shape[1]} for images shaped {batch.shape}, got {num_bits}")
  _, val = _peak(blocks)
  votes = np.abs(val) % scale > 0.5 * scale  # (N, B); block k votes for bit k % num_bits
  n, num_blocks = votes.shape
  padded = np.zeros((n, -(-num_blocks // num_bits) * num_bits), np.int64)
  padded[:, :num_blocks] = votes
  counts = np.bincount(np.arange(num_blocks) % num_bits, minlength=num_bits)
  scores = padded.reshape(n, -1, num_bits).sum(1) / counts  # exact integer sums: the package's np.mean values
  bits = scores * 255 > 127
  return DecodedBits(bits[0], scores[0]) if single else DecodedBits(bits, scores)
